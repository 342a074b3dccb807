"""The Hugging Face export ships a tokenizer folder that transformers' AutoTokenizer, loading it, tokenizes as its
tokenizer.json does (README, Checkpoints and Hugging Face): where the tokenizer_class named is one that transformers 5
rebuilds from tokenizer.json's vocabulary and merges with a pipeline of its own (GPT2Tokenizer) and that pipeline
differs (a Lowercase normalizer; SmolLM2's digit splitting), the export's tokenizer_config.json names
PreTrainedTokenizerFast instead, which loads tokenizer.json whole, and says so in a note; a folder that still
tokenizes otherwise is refused. Against AutoTokenizer of the source folder and `tokenizers` itself."""
from __future__ import annotations

import dataclasses
import base64
import contextlib
import inspect
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest
import transformers
from tokenizers import Tokenizer, decoders, normalizers

from checkpoint_helpers import TINY
from convert_hf_helpers import WITH_BYTES, byte_tokenizer, cli, trained_checkpoint, unigram_tokenizer
from helpers import CORPUS, load_tool

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.errors import UserError

NOTE_END = "the export's tokenizer_config.json names PreTrainedTokenizerFast instead, which loads tokenizer.json whole"
CODE = inspect.getsource(base64)  # real text: code, prose in docstrings, whitespace runs, digits
PROSE = "Is it ? Yes , it is . I 've seen x != y ! Haven 't you ?"  # what clean_up_tokenization_spaces rewrites


def with_config(folder: Path, tokenizer_class: str, **fields) -> Path:
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class, **fields}))
    return folder


def same_ids(folder: Path, texts: list[str]) -> bool:
    """AutoTokenizer of FOLDER gives its tokenizer.json's ids for each of TEXTS (no special tokens added)."""
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return all(auto(t, add_special_tokens=False)["input_ids"] == reference.encode(t, add_special_tokens=False).ids
               for t in texts)


def same_decoding(folder: Path, texts: list[str]) -> bool:
    """AutoTokenizer of FOLDER decodes the ids its tokenizer.json gives each of TEXTS as tokenizer.json does (special
    tokens kept)."""
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    encoded = [reference.encode(t, add_special_tokens=False).ids for t in texts]
    return all(auto.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
               for ids in encoded)


def exported_saying(run: Path, folder: Path, out: Path) -> list[str]:
    """convert_to_hf of RUN shipping FOLDER's tokenizer to OUT: succeeds, nothing on stderr; its stdout lines."""
    proc = cli("convert_to_hf.py", "--checkpoint", str(run), "--output", str(out), "--tokenizer", str(folder),
               "--no-progress")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout.splitlines()


@contextlib.contextmanager
def transformers_log_lines(forgetting_said_once: bool = True) -> Iterator[list[str]]:
    """The lines transformers' loggers give its handler (what it prints on stderr, at its default level, warning)
    while the block runs, each message said once (transformers says some once per process: its cache of those is
    emptied first, unless FORGETTING_SAID_ONCE is false; tests that run before in the same process may have set its
    level to error)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    library = logging.getLogger("transformers")
    level = library.level
    if forgetting_said_once:
        transformers.utils.logging.warning_once.cache_clear()
    library.setLevel(logging.WARNING)
    library.addHandler(handler)
    try:
        yield lines
    finally:
        library.removeHandler(handler)
        library.setLevel(level)


@pytest.fixture(scope="module")
def lowercasing(tmp_path_factory) -> Path:
    """The tiny byte tokenizer given a Lowercase normalizer: tokenizer.json lowercases, GPT2Tokenizer's rebuild does
    not."""
    folder = tmp_path_factory.mktemp("lowercasing")
    tok = Tokenizer.from_file(str(byte_tokenizer(folder)))
    tok.normalizer = normalizers.Lowercase()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def unigram(tmp_path_factory) -> Path:
    """convert_hf_helpers.unigram_tokenizer's tiny Unigram (not BPE: transformers 5 applies
    clean_up_tokenization_spaces when decoding it), alone in its folder."""
    folder = tmp_path_factory.mktemp("unigram")
    unigram_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory.mktemp("run") / "run", cfg=WITH_BYTES)[0].parent


def test_a_tokenizer_class_that_tokenizes_otherwise_is_shipped_as_pretrained_tokenizer_fast(lowercasing, run, tmp_path):
    """A tokenizer_config.json naming GPT2Tokenizer beside a lowercasing tokenizer.json: transformers builds
    GPT2Tokenizer from the vocabulary alone, so the export loaded in transformers but tokenized "The" otherwise than the
    store, and said nothing. Now its tokenizer_config.json names PreTrainedTokenizerFast (its other fields kept; the
    source folder untouched), in one note naming the file, the class and the text, and it tokenizes as the store."""
    folder = with_config(lowercasing, "GPT2Tokenizer", eos_token="<|endoftext|>", model_max_length=64)
    source_config = (folder / "tokenizer_config.json").read_bytes()
    assert not same_ids(folder, ["The Fox"])  # the reference: AutoTokenizer of the source folder
    out = tmp_path / "hf"
    note, done = exported_saying(run, folder, out)
    assert note.startswith(f'note: {folder / "tokenizer_config.json"}: tokenizer_class "GPT2Tokenizer", which '
                           f"transformers {transformers.__version__} builds as GPT2Tokenizer, tokenizes text "
                           'otherwise than its tokenizer.json (first "') and note.endswith(f"): {NOTE_END}"), note
    assert done.startswith("exported step 2 of ")
    shipped = json.loads((out / "tokenizer_config.json").read_text())
    assert shipped == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                       "model_max_length": 64}
    assert same_ids(out, ["The Fox", "MiXeD", CODE])
    assert (folder / "tokenizer_config.json").read_bytes() == source_config


@pytest.mark.parametrize("tokenizer_class, failure", [
    ("BertTokenizer", 'builds as BertTokenizer, fails to tokenize text (first "The quick brown fox jumps over the lazy '
                      '...": WordPiece error: Missing [UNK] token from the vocabulary)'),
    ("T5Tokenizer", "cannot load from the folder the export would ship ("),
], ids=["BertTokenizer", "T5Tokenizer"])
def test_a_tokenizer_class_failing_on_the_folder_is_shipped_as_pretrained_tokenizer_fast(tokenizer_class, failure,
                                                                                          run, tmp_path):
    """A tokenizer_class transformers rebuilds from a vocabulary it was not made for fails: BertTokenizer, beside the
    byte tokenizer (no [UNK]), loads but raises on any text (the export ended in a traceback), T5Tokenizer does not
    load (the export was refused). Both are shipped as a class that tokenizes otherwise is: naming
    PreTrainedTokenizerFast, in a note saying how the class failed, tokenizing as the store."""
    folder = with_config(byte_tokenizer(tmp_path / "tok").parent, tokenizer_class, eos_token="<|endoftext|>")
    out = tmp_path / "hf"
    note, _ = exported_saying(run, folder, out)
    assert note.startswith(f'note: {folder / "tokenizer_config.json"}: tokenizer_class "{tokenizer_class}", which '
                           f"transformers {transformers.__version__} {failure}"), note
    assert note.endswith(f": {NOTE_END}"), note
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert same_ids(out, ["The Fox", CODE])


@pytest.mark.parametrize("normalizer, text, failure", [
    (normalizers.NFC(), "cafe\u0301 re\u0301sume\u0301", "tokenizes text otherwise than its tokenizer.json (first"),
    (normalizers.Replace("``", '"'), "``quoted''", "with another normalizer than its tokenizer.json's (none, not "
                                                   "Replace)"),
], ids=["NFC", "Replace"])
def test_a_normalizer_the_prose_probes_leave_unchanged_is_caught_too(normalizer, text, failure, run, tmp_path):
    """A normalizer that changes only text no probe held, beside GPT2Tokenizer (rebuilt without it): the folder was
    shipped naming GPT2Tokenizer, tokenizing TEXT otherwise than the store. NFC (decomposed accents) is now probed;
    a Replace of any pattern is caught by the pipelines' normalizers compared. Shipped naming
    PreTrainedTokenizerFast, tokenizing as the store."""
    folder = with_config(byte_tokenizer(tmp_path / "tok").parent, "GPT2Tokenizer", eos_token="<|endoftext|>")
    edited = Tokenizer.from_file(str(folder / "tokenizer.json"))
    edited.normalizer = normalizer
    edited.save(str(folder / "tokenizer.json"))
    assert not same_ids(folder, [text])  # the reference: AutoTokenizer of the source folder
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
    assert f"builds as GPT2Tokenizer, {failure}" in said[0] and said[0].endswith(NOTE_END), said
    assert same_ids(out, [text, CODE])


def test_the_rewritten_tokenizer_config_keeps_its_unicode_under_any_locale(lowercasing, run, tmp_path):
    """The export's copy of tokenizer_config.json is read and written as UTF-8 (what transformers reads), not in the
    locale's encoding: under an ASCII one (LC_ALL=C without Python's UTF-8 mode) a chat template holding "é" ended
    every export with transformers installed in a UnicodeDecodeError traceback. Its text is kept."""
    template = "Réponse : {{ messages[0]['content'] }} 🙂"
    folder = lowercasing
    (folder / "tokenizer_config.json").write_text(json.dumps(  # as transformers saves it: UTF-8, not \u escapes
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "chat_template": template},
        ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "hf"
    proc = cli("convert_to_hf.py", "--checkpoint", str(run), "--output", str(out), "--tokenizer", str(folder),
               "--no-progress", env={"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    shipped = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert shipped["chat_template"] == template and shipped["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_a_folder_still_tokenizing_otherwise_is_refused(lowercasing, run, tmp_path, monkeypatch):
    """Should PreTrainedTokenizerFast too tokenize otherwise (a transformers that reads more of tokenizer_config.json
    into its pipeline; stood in for by an AutoTokenizer that lowercases nothing), the export is refused: one line
    naming the file, the class and the text, exit 2, no folder."""
    folder = with_config(lowercasing, "GPT2Tokenizer", eos_token="<|endoftext|>")
    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain.normalizer = None

    class NotLowercasing:
        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": plain.encode(text, add_special_tokens=add_special_tokens).ids}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: NotLowercasing())
    with pytest.raises(UserError) as refused:
        export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=lambda _: None)
    assert str(refused.value).startswith(f'{folder / "tokenizer_config.json"}: tokenizer_class "GPT2Tokenizer", '
                                         "which transformers") \
        and ", and PreTrainedTokenizerFast in its place, with the folder's other settings, which transformers " \
        in str(refused.value)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


def test_the_runs_own_tokenizer_that_tokenizes_otherwise_is_shipped_so_too(lowercasing, tmp_path):
    """The run's data.tokenizer (no --tokenizer) likewise: shipped naming PreTrainedTokenizerFast, with the note, and
    config.json's ids are its own."""
    folder = with_config(lowercasing, "GPT2Tokenizer", eos_token="<|endoftext|>")
    trained_checkpoint(tmp_path / "run", cfg=WITH_BYTES, config={"data": {"tokenizer": str(folder)}})
    said = []
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False, log=said.append)
    assert said[0].startswith("note: ") and said[0].endswith(NOTE_END) and len(said) == 2, said
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    eos = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    assert same_ids(out, ["The Fox", CODE])


def test_pretrained_tokenizer_fast_loads_tokenizer_json_whole(lowercasing, run, tmp_path):
    """The same folder naming PreTrainedTokenizerFast is shipped, the command saying nothing more (transformers
    neither: its load and the probes print nothing, even with a model_max_length shorter than the probes, which it
    warns about when tokenizing), and tokenizes as tokenizer.json does."""
    folder = with_config(lowercasing, "PreTrainedTokenizerFast", eos_token="<|endoftext|>", model_max_length=4)
    out = tmp_path / "hf"
    proc = cli("convert_to_hf.py", "--checkpoint", str(run), "--output", str(out), "--tokenizer", str(folder),
               "--no-progress")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines() == [f"exported step 2 of {run / 'step_0000002'} to {out} (float32)"]
    assert same_ids(out, ["The Fox", "MiXeD", CODE])
    assert same_ids(out, ["The Fox", "MiXeD", CODE])


@pytest.mark.parametrize("tokenizer_class, fields, line", [
    ("LlamaTokenizer", {}, "`tokenizer_class` is `LlamaTokenizer` but `tokenizer.json` is ByteLevel"),
    ("LlamaTokenizerFast", {}, "`tokenizer_class` is `LlamaTokenizerFast` but `tokenizer.json` is ByteLevel"),
    ("PreTrainedTokenizerFast", {"clean_up_tokenization_spaces": True},
     "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer TokenizersBackend"),
], ids=["LlamaTokenizer", "LlamaTokenizerFast", "clean_up-BPE"])
def test_transformers_own_log_lines_on_the_probe_load_are_kept_out(tokenizer_class, fields, line, run, tmp_path):
    """LlamaTokenizer(Fast) named beside a byte-level tokenizer.json: transformers loads it as TokenizersBackend
    (whole), which tokenizes as the store, and prints a line of its own on that ("`tokenizer_class` is `LlamaTokenizer`
    but `tokenizer.json` is ByteLevel; ..."): the export's output held it, about a load the user did not ask for; so
    would the line transformers 5 prints on decoding with clean_up_tokenization_spaces true for a BPE tokenizer (which
    it ignores there: the folder decodes as tokenizer.json). The folder is shipped as it is, the export saying its own
    line only; transformers' log level is left as it was, and so is its memory of the lines it says once per process:
    the user's own load of the folder after the export (in the same process) said nothing, the line spent on the
    export's load."""
    folder = with_config(byte_tokenizer(tmp_path / "tok").parent, tokenizer_class, eos_token="<|endoftext|>", **fields)
    said = []
    with transformers_log_lines() as lines:
        out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
        assert logging.getLogger("transformers").level == logging.WARNING  # as the export found it
    assert lines == [] and len(said) == 1 and said[0].startswith("exported step 2 of "), (lines, said)
    assert logging.Logger.warning_once is transformers.utils.logging.warning_once
    assert json.loads((out / "tokenizer_config.json").read_text()) == json.loads(
        (folder / "tokenizer_config.json").read_text())
    with transformers_log_lines(forgetting_said_once=False) as lines:  # the reference: as on any load of the folder
        assert same_ids(out, [PROSE, CODE]) and same_decoding(out, [PROSE, CODE])
    assert any(line in said_by_transformers for said_by_transformers in lines), lines


@pytest.mark.parametrize("decoder, text, failure", [
    (decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)]), "  two spaces",
     'decodes ids otherwise than its tokenizer.json (first those of "   leading spaces, trailing spaces   ": '
     '"   leading spaces, t...", not "  leading spaces, tr...")'),
    (decoders.Sequence([decoders.ByteLevel(), decoders.Replace("§", "S")]), "§ 1",
     "with another decoder than its tokenizer.json's (ByteLevel, not Sequence)"),
], ids=["Strip", "Replace"])
def test_a_tokenizer_class_decoding_otherwise_is_shipped_as_pretrained_tokenizer_fast(decoder, text, failure, run,
                                                                                       tmp_path):
    """GPT2Tokenizer beside a tokenizer.json whose decoder is not the plain ByteLevel one transformers rebuilds it with
    (its vocabulary, merges and pre-tokenizer are: it tokenizes as the store): a user decoding the model's ids got
    other text than tokenizer.json gives, and the export said nothing. A decoder that changes the probes' text (Strip)
    is caught by decoding their ids; one of a pattern no probe holds (Replace), by the decoders compared. Shipped
    naming PreTrainedTokenizerFast, in a note, decoding as tokenizer.json."""
    folder = with_config(byte_tokenizer(tmp_path / "tok").parent, "GPT2Tokenizer", eos_token="<|endoftext|>")
    edited = Tokenizer.from_file(str(folder / "tokenizer.json"))
    edited.decoder = decoder
    edited.save(str(folder / "tokenizer.json"))
    assert same_ids(folder, [text, CODE]) and not same_decoding(folder, [text])  # the reference
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
    assert said[0] == f'note: {folder / "tokenizer_config.json"}: tokenizer_class "GPT2Tokenizer", which ' \
                      f"transformers {transformers.__version__} builds as GPT2Tokenizer, {failure}: {NOTE_END}", said
    assert same_decoding(out, [text, CODE]) and same_ids(out, [text, CODE])


def test_a_tokenizer_json_without_a_decoder_is_no_reference_for_decoding(run, tmp_path):
    """A byte-level tokenizer.json with no decoder (one trained with tokenizers, its decoder never set) beside
    GPT2Tokenizer, which transformers rebuilds with the ByteLevel decoder: tokenizers joins the tokens' own strings
    ("ĠThe"), GPT2Tokenizer gives the text back. Comparing the decoding replaced the class by PreTrainedTokenizerFast
    in a note, shipping a folder that decoded into those strings where the source folder decoded into the text. With
    no decoder in tokenizer.json there is no decoding of its own to keep: shipped as it is, with no note, decoding
    text back (the reference: the text itself)."""
    folder = with_config(byte_tokenizer(tmp_path / "tok").parent, "GPT2Tokenizer", eos_token="<|endoftext|>")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["decoder"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert reference.decode(reference.encode(PROSE, add_special_tokens=False).ids) != PROSE  # the tokens' strings
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
    assert len(said) == 1 and said[0].startswith("exported step 2 of "), said
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    assert same_ids(out, [PROSE, CODE])
    auto = transformers.AutoTokenizer.from_pretrained(out)
    for text in (PROSE, CODE):
        assert auto.decode(reference.encode(text, add_special_tokens=False).ids) == text


@pytest.mark.parametrize("part, edited", [
    ("decoder", {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}),
    ("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}),
], ids=["decoder", "pre_tokenizer"])
def test_byte_level_flags_that_change_nothing_are_not_a_difference(part, edited, run, tmp_path):
    """GPT2Tokenizer beside a tokenizer.json whose ByteLevel decoder holds its flags false (tokenizers decodes bytes
    alike whatever they hold), or whose ByteLevel pre-tokenizer holds trim_offsets false (read by its post-processor
    only): the folder tokenizes and decodes as tokenizer.json, yet the parts compared differed in those fields, so it
    was shipped naming PreTrainedTokenizerFast in a note "with another decoder than its tokenizer.json's (ByteLevel,
    not ByteLevel)". Shipped as it is, with no note."""
    folder = with_config(byte_tokenizer(tmp_path / "tok").parent, "GPT2Tokenizer", eos_token="<|endoftext|>")
    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer[part] = edited
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    reread = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert json.loads(getattr(reread, part).__getstate__()) == edited  # tokenizers keeps the flags it ignores
    for text in (PROSE, CODE):  # the reference: tokenizers itself, before and after the edit
        ids = plain.encode(text, add_special_tokens=False).ids
        assert reread.encode(text, add_special_tokens=False).ids == ids and reread.decode(ids) == plain.decode(ids)
    assert same_ids(folder, [PROSE, CODE]) and same_decoding(folder, [PROSE, CODE])
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
    assert len(said) == 1 and said[0].startswith("exported step 2 of "), said
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"


@pytest.mark.parametrize("tokenizer, fields", [
    ("Unigram", {}),
    ("BPE", {"clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True}),
], ids=["Unigram", "BPE-forced"])
def test_clean_up_tokenization_spaces_that_changes_decoding_is_set_false(tokenizer, fields, unigram, run, tmp_path):
    """clean_up_tokenization_spaces true (what transformers 4 saved into many folders) in the tokenizer_config.json
    shipped: transformers 5 decodes ids with the spaces before punctuation gone ("x != y" comes back "x!= y") for a
    tokenizer that is not BPE (for BPE only with ..._even_though_it_will_corrupt_output true), rewriting the text the
    model generates, and the export said nothing. The export's copy sets it false (its other fields kept; the source
    untouched), in a note naming the setting, and decodes as tokenizer.json."""
    folder = unigram if tokenizer == "Unigram" else byte_tokenizer(tmp_path / "tok").parent
    fields = {"eos_token": "<|endoftext|>", "clean_up_tokenization_spaces": True, **fields}
    with_config(folder, "PreTrainedTokenizerFast", **fields)
    assert not same_decoding(folder, [PROSE])  # the reference: AutoTokenizer of the source folder
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
    assert said[0].startswith(f'note: {folder / "tokenizer_config.json"}: clean_up_tokenization_spaces true: the '
                              f"folder, which transformers {transformers.__version__} builds as TokenizersBackend, "
                              "decodes ids otherwise than its tokenizer.json (first those of ") \
        and said[0].endswith(": the export's tokenizer_config.json sets it false") and len(said) == 2, said
    assert json.loads((out / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast", **fields, "clean_up_tokenization_spaces": False}
    assert same_decoding(out, [PROSE, CODE]) and same_ids(out, [PROSE, CODE])
    assert json.loads((folder / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is True


@pytest.mark.parametrize("tokenizer_class, built", [("PreTrainedTokenizerFast", "TokenizersBackend"),
                                                    ("GPT2Tokenizer", "GPT2Tokenizer")])
def test_split_special_tokens_is_named_in_the_refusal(tokenizer_class, built, run, tmp_path):
    """split_special_tokens true: transformers tokenizes "<|endoftext|>" written in text as its characters, where the
    store holds the token, a choice made for the model's users, not a leftover, so the folder is refused rather than
    the setting dropped. The refusal named the class only ("tokenizes text otherwise"; GPT2Tokenizer: replaced by
    PreTrainedTokenizerFast, to the same end), not the setting: now its one line names the setting. No folder."""
    folder = with_config(byte_tokenizer(tmp_path / "tok").parent, tokenizer_class, eos_token="<|endoftext|>",
                         split_special_tokens=True)
    assert not same_ids(folder, ["<|endoftext|>hi"]) and same_ids(folder, [CODE])  # the reference
    with pytest.raises(UserError) as refused:
        export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=lambda _: None)
    assert str(refused.value) == (
        f'{folder / "tokenizer_config.json"}: split_special_tokens true: the folder, which transformers '
        f"{transformers.__version__} builds as {built}, tokenizes text otherwise than its tokenizer.json (first "
        '"<|endoftext|>a<|endoftext|>b <|endoftext..."): a special token written in text is split into '
        "other tokens, where the store holds the token (set it false, or remove it, to ship this tokenizer)")
    assert list(tmp_path.iterdir()) == [tmp_path / "tok"]


def test_an_id_two_tokens_share_is_not_decoded_to_ship_or_refuse_by_chance(run, tmp_path):
    """A tokenizer.json whose vocabulary gives two tokens one id (a hand edit; tests/test_tokenizer_damage_properties.py
    found it): tokenizers decodes that id as either, which one differing from load to load, so comparing the decoding
    shipped or refused the folder by chance. The probes holding such an id are not decoded: the folder is shipped, as
    before decoding was compared, every time (six exports)."""
    folder = byte_tokenizer(tmp_path / "tok").parent
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["e"] = vocab["t"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with_config(folder, "PreTrainedTokenizerFast", eos_token="<|endoftext|>")
    # the reference: tokenizers itself, load to load
    assert {Tokenizer.from_file(str(folder / "tokenizer.json")).decode([vocab["t"]]) for _ in range(20)} == {"e", "t"}
    for attempt in range(6):
        said = []
        export_to_hf(run, tmp_path / f"hf{attempt}", tokenizer=str(folder), progress=False, log=said.append)
        assert len(said) == 1 and said[0].startswith("exported step 2 of "), said


def test_a_tokenizer_json_holding_truncation_and_padding_is_shipped(run, tmp_path):
    """Truncation and padding in tokenizer.json (transformers saves those of a call) are not its pipeline: the store
    holds each document whole (nanotronix.data.read_tokenizer_file) and AutoTokenizer applies them only when a call
    asks. The probes compared AutoTokenizer's ids with tokenizers' truncated or padded ones, and refused the folder."""
    folder = with_config(byte_tokenizer(tmp_path / "tok").parent, "PreTrainedTokenizerFast", eos_token="<|endoftext|>")
    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))  # the reference: the file before the edit
    edited = Tokenizer.from_file(str(folder / "tokenizer.json"))
    edited.enable_truncation(max_length=8)
    edited.enable_padding(pad_id=0, length=100)
    edited.save(str(folder / "tokenizer.json"))
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
    assert len(said) == 1 and said[0].startswith("exported step 2 of "), said
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto(CODE, add_special_tokens=False)["input_ids"] == plain.encode(CODE, add_special_tokens=False).ids


def test_without_transformers_the_check_is_said_not_run(lowercasing, run, tmp_path, monkeypatch):
    """Where transformers cannot be imported the folder is shipped as before, and the export says the check was not
    run."""
    folder = with_config(lowercasing, "GPT2Tokenizer", eos_token="<|endoftext|>")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
    assert "note: transformers is not installed: the tokenizer shipped was not checked to tokenize as its " \
           "tokenizer.json does (install transformers to check it)" in said, said
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def smollm2_folder(tokenizer_file: str, folder: Path, tokenizer_class: str) -> Path:
    """SmolLM2's tokenizer.json with a tokenizer_config.json as its Hub folder's (written by transformers 4:
    GPT2Tokenizer, the added tokens in added_tokens_decoder and additional_special_tokens), naming TOKENIZER_CLASS."""
    folder.mkdir()
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for t in added}
    return with_config(folder, tokenizer_class, add_prefix_space=False, added_tokens_decoder=decoder,
                       additional_special_tokens=[t["content"] for t in added], bos_token="<|endoftext|>",
                       clean_up_tokenization_spaces=False, eos_token="<|endoftext|>", model_max_length=8192,
                       unk_token="<|endoftext|>", vocab_size=49152)


def test_smollm2s_gpt2_tokenizer_class_is_shipped_as_pretrained_tokenizer_fast(smollm2_tokenizer_path, tmp_path):
    """SmolLM2's own folder (GPT2Tokenizer) does not tokenize as its tokenizer.json under transformers 5: its
    pre-tokenizer splits digits before the byte-level one; GPT2Tokenizer's keeps the space before a digit in one piece
    with it, which its vocabulary (trained on split digits) cannot merge ("x  =  1": two tokens for the two spaces, not
    one), as in much code (base64's source). Shipped naming PreTrainedTokenizerFast, it tokenizes as tokenizer.json
    does, with the source folder's special tokens."""
    trained_checkpoint(tmp_path / "run", cfg=dataclasses.replace(TINY, vocab_size=49152))
    hub = smollm2_folder(smollm2_tokenizer_path, tmp_path / "hub", "GPT2Tokenizer")
    assert not same_ids(hub, ["x  =  1"]) and not same_ids(hub, [CODE])  # the reference
    assert same_ids(hub, ["The quick brown fox, 1234567 and 3.14159"])  # where the two pipelines agree
    said = []
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", tokenizer=str(hub), progress=False, log=said.append)
    assert said[0].startswith(f'note: {hub / "tokenizer_config.json"}: tokenizer_class "GPT2Tokenizer"') \
        and len(said) == 2, said  # that note only: it decodes as tokenizer.json
    assert same_ids(out, ["x  =  1", CODE, "<|im_start|>user\nhi<|im_end|>"])
    source, shipped = (transformers.AutoTokenizer.from_pretrained(f) for f in (hub, out))
    assert {t: shipped.convert_tokens_to_ids(t) for t in source.all_special_tokens} == \
        {t: source.convert_tokens_to_ids(t) for t in source.all_special_tokens}
    assert (shipped.bos_token, shipped.eos_token) == (source.bos_token, source.eos_token)
    assert same_decoding(out, [PROSE, CODE, "<|im_start|>user\nhi<|im_end|>"])
    said = []  # its tokenizer.json alone (a run's data.tokenizer): shipped with the export's own config, no note
    out = export_to_hf(tmp_path / "run", tmp_path / "bare", tokenizer=smollm2_tokenizer_path, progress=False,
                       log=said.append)
    assert len(said) == 1 and said[0].startswith("exported step 2 of "), said
    assert same_ids(out, [PROSE, CODE]) and same_decoding(out, [PROSE, CODE, "<|im_start|>user\nhi<|im_end|>"])


def test_the_quickstarts_tokenizer_is_shipped_without_a_note(run, tmp_path):
    """A tokenizer.json of tools/train_tokenizer.py (the quickstart's: byte-level BPE after digit splitting, as
    SmolLM2's) is shipped with the export's own tokenizer_config.json, saying nothing but the export's line, and
    tokenizes and decodes as itself."""
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS * 20) + "\n" + CODE)
    tokenizer = tmp_path / "tokenizer.json"
    assert load_tool("train_tokenizer").main(["--input", str(tmp_path / "corpus.txt"), "--output", str(tokenizer),
                                              "--vocab-size", "300"]) == 0
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(tokenizer), progress=False, log=said.append)
    assert len(said) == 1 and said[0].startswith("exported step 2 of "), said
    assert same_ids(out, [PROSE, CODE]) and same_decoding(out, [PROSE, CODE])
