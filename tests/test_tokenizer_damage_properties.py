"""Property-based tests (hypothesis, configured in tests/properties.py) of what the tokenizer's readers do with a
damaged or hand-edited tokenizer folder (README, Token stores and Checkpoints and Hugging Face): tools/preprocess.py
and tools/convert_to_hf.py --tokenizer, called in this process on a copy of a real Hugging Face tokenizer folder whose
files were edited, exit 0 giving the token ids `tokenizers.Tokenizer.from_file` gives (the store) and the BOS / EOS
ids `transformers.AutoTokenizer` reports (the export's config.json, and its folder, which AutoTokenizer loads with
them and which tokenizes as tokenizer.json does), or end with ONE `error: ...` line (exit 2) naming the folder or
one of its files; never a traceback, a half-written output, or other ids than the references'. The trainer's and the
launch preflight's reading of it as data.tokenizer (a start note when it is not the store's file, or holds no
tokenizer.json) and convert_from_hf's record of it (step 0's data.tokenizer, and what an export of the import ships
from it: what the --tokenizer export shipped, or nothing and one warning naming it) are held to the same folders.

The folders: a small byte-level BPE trained here, and the real SmolLM2 tokenizer (NANOTRONIX_SMOLLM2_TOKENIZER;
skipped, saying so, without it), each given an instruct tokenizer's <|im_start|> / <|im_end|> as BOS / EOS and
saved by transformers' own save_pretrained (tokenizer.json, tokenizer_config.json, chat_template.jinja), with the
special_tokens_map.json transformers 4 wrote beside them. The edits: tokenizer.json's text damaged
(tests/properties.py's damaged_json), its vocab, added_tokens or model edited (an id out of range, a duplicate id,
a special token removed or renamed, another model); tokenizer_config.json's or special_tokens_map.json's special
tokens, extra special tokens (additional_special_tokens, extra_special_tokens: lists, mappings, 10^5 items; a
model's own image_token), model_max_length or chat_template given values of other types or tokens the vocabulary
lacks, or their text damaged; an added_tokens_decoder as transformers 4 saved it (AutoTokenizer then reads no
special_tokens_map.json) given a new token, other properties or ids, entries or keys of other types; a file
deleted, emptied, replaced by a folder or given non-UTF-8 bytes. The cases it found are held one by one in
tests/test_tokenizer_damage_cases.py.

Where a reference refuses and a reader accepts, the test says why that is right: preprocess reads tokenizer.json
alone (its EOS from tokenizer_config.json only when <|endoftext|> is not a token), so a tokenizer_config.json or
chat template AutoTokenizer cannot read does not change a token it writes. Where AutoTokenizer reports no BOS or
EOS (none named, or no tokenizer_config.json, which the export then writes), the export's config.json says the EOS
the data pipeline ends documents with, as README says: the store's. The folder shipped loads with the special tokens
(extra ones too) and ids of the one given, and tokenizes a text holding them alike. ~25 s on one core."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import transformers
from hypothesis import event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from checkpoint_helpers import TINY
from convert_hf_helpers import trained_checkpoint
from helpers import CORPUS, load_tool, read_megatron_plainly, train_tiny_tokenizer
from properties import PROPERTY, damaged_json
from test_cli_properties import call_and_check

TEXT = "".join(CORPUS) + " <|im_start|>user hi<|im_end|> <|endoftext|> <nope> end"
TOKENIZER_JSON, CONFIG, SPECIAL_MAP, CHAT = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                             "chat_template.jinja")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
EXTRA_KEYS = ("additional_special_tokens", "extra_special_tokens", "image_token")
MODEL_VOCAB = 49152  # SmolLM2's: both tokenizers fit the exported model
# Refusals of a folder both references read (and AutoTokenizer without making a token special): ids past the
# model's vocabulary (an IndexError in generate()) or past what a store's int32 holds, no token that ends a document
# (README, Token stores); an added_tokens_decoder entry other than tokenizer.json's added token (its properties, or id:
# the files disagree), or one lacking such a token (what a tokenizer_class that rebuilds the tokenizer, GPT2Tokenizer,
# drops; README, Checkpoints and Hugging Face)
DOCUMENTED = ("more than the model's vocabulary", "past the largest a token store holds",
              "has no end-of-document token", "differs from tokenizer.json's", "in its tokenizer.json",
              "an added token of its tokenizer.json (AutoTokenizer builds")


def hf_folder(tokenizer_file: Path, folder: Path) -> Path:
    """FOLDER holding TOKENIZER_FILE's tokenizer as transformers saves an instruct tokenizer, plus the
    special_tokens_map.json (AddedToken dicts) that transformers 4 wrote."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                                model_max_length=8192)
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>\n{% endfor %}"
    fast.save_pretrained(folder)
    added = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (folder / SPECIAL_MAP).write_text(json.dumps({"bos_token": {"content": "<|im_start|>", **added},
                                                  "eos_token": {"content": "<|im_end|>", **added},
                                                  "unk_token": {"content": "<|endoftext|>", **added}}, indent=2))
    assert {p.name for p in folder.iterdir()} == {TOKENIZER_JSON, CONFIG, SPECIAL_MAP, CHAT}
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The tiny tokenizer's folder, a checkpoint to export (SmolLM2's vocabulary size), a text file to tokenize."""
    root = tmp_path_factory.mktemp("tokenizer_damage")
    tiny = hf_folder(train_tiny_tokenizer(root / "raw" / TOKENIZER_JSON, vocab_size=300), root / "tiny")
    trained_checkpoint(root / "run", cfg=dataclasses.replace(TINY, vocab_size=MODEL_VOCAB))
    (root / "text.txt").write_text(TEXT)
    # a store of the undamaged tiny tokenizer: the trainer's data.tokenizer is compared with its sidecar's file
    assert load_tool("preprocess").main(["--input", str(root / "text.txt"), "--tokenizer", str(tiny),
                                         "--output-prefix", str(root / "store"), "--workers", "1",
                                         "--no-progress"]) == 0
    return {"root": root, "tiny": tiny, "run": root / "run", "text": root / "text.txt", "store": root / "store"}


@pytest.fixture(scope="module")
def smollm2(world, smollm2_tokenizer_path) -> Path:
    return hf_folder(Path(smollm2_tokenizer_path), world["root"] / "smollm2")


# --- the edits ----------------------------------------------------------------------------------------------------

def a_token(draw, tokenizer: dict) -> str:
    """One of the folder's tokens: a special one more often than a word piece."""
    added = [t["content"] for t in tokenizer["added_tokens"]]
    return draw(st.sampled_from(added + [draw(st.sampled_from(sorted(tokenizer["model"]["vocab"])[:50]))]))


def edit_tokenizer_json(folder: Path, draw) -> str:
    tokenizer = json.loads((folder / TOKENIZER_JSON).read_text())
    vocab, added = tokenizer["model"]["vocab"], tokenizer["added_tokens"]
    kind = draw(st.sampled_from(["id_out", "id_dup", "removed", "renamed", "added_id", "model", "none"]))
    if kind == "id_out":  # a token the text uses given an id past the vocabulary (or not one)
        token = draw(st.sampled_from(["\u0120", "e", "t", "<|endoftext|>"]))
        vocab[token] = draw(st.sampled_from([len(vocab) + len(added), 70_000, 2 ** 31, -1, "7", None]))
    elif kind == "id_dup":
        vocab[draw(st.sampled_from(["\u0120", "e"]))] = vocab[draw(st.sampled_from(["t", "<|endoftext|>"]))]
    elif kind == "removed":
        index = draw(st.integers(0, len(added) - 1))
        content = added.pop(index)["content"]
        if draw(st.booleans()):
            vocab.pop(content, None)
    elif kind == "renamed":
        entry = draw(st.sampled_from(added))
        new = draw(st.sampled_from(["<eot>", entry["content"] + "x", "", "</s>"]))
        vocab[new] = vocab.pop(entry["content"], entry["id"])
        entry["content"] = new
    elif kind == "added_id":
        draw(st.sampled_from(added))["id"] = draw(st.sampled_from([0, 3, 70_000, -1]))
    elif kind == "model":
        tokenizer["model"] = copy.deepcopy(draw(st.sampled_from([None, {}, [], {"type": "WordPiece"},
                                                                 {**tokenizer["model"], "type": "Unigram"}])))
    data, damage = draw(damaged_json(tokenizer))
    (folder / TOKENIZER_JSON).write_bytes(data)
    return f"tokenizer.json {kind} {damage}"


def special_value(draw, tokenizer: dict):
    token = a_token(draw, tokenizer)
    return draw(st.sampled_from([None, token, {"content": token}, {"__type": "AddedToken", "content": token},
                                 "<nope>", "", 5, [token], True, {"__type": "AddedToken"}]))


def extra_value(draw, tokenizer: dict):
    """A value of an extra-token key: a list of tokens (one the vocabulary lacks, a plain one, a duplicate, 10^5 of
    them, items of other types), a mapping of named tokens, or another type."""
    token = a_token(draw, tokenizer)
    return draw(st.sampled_from([None, [token], [token, token], ["<nope>"], [token, 5], [{"content": token}],
                                 [{"__type": "AddedToken", "content": token}], {"image_token": token},
                                 {"image_token": 5}, token, 5, True, [token] * 10 ** 5]))


def edit_hf_config(name: str, folder: Path, draw) -> str:
    if not (folder / name).is_file():
        return f"{name} absent"
    config = json.loads((folder / name).read_text())
    tokenizer = json.loads((folder / TOKENIZER_JSON).read_text())
    kind = draw(st.sampled_from(["special", "extra", "extra", "delete", "max_length", "chat_template", "none"]))
    if kind == "special":
        key = draw(st.sampled_from(SPECIAL_KEYS))
        config[key] = special_value(draw, tokenizer)
    elif kind == "extra":  # the tokens AutoTokenizer makes special besides the named ones (a model's own: image_token)
        key = draw(st.sampled_from(EXTRA_KEYS))
        config[key] = special_value(draw, tokenizer) if key == "image_token" else extra_value(draw, tokenizer)
    elif kind == "delete":
        config.pop(draw(st.sampled_from(sorted(config))))
    elif kind == "max_length":
        config["model_max_length"] = draw(st.sampled_from([10 ** 40, 1e30, -1, 0, "8192", None]))
    elif kind == "chat_template":
        config["chat_template"] = draw(st.sampled_from([5, None, ["x"], [{"name": "default", "template": "x"}], {},
                                                        "{% for m in messages %}{{ m['content'] }}{% endfor %}"]))
    data, damage = draw(damaged_json(config))
    (folder / name).write_bytes(data)
    return f"{name} {kind} {damage}"


def edit_file(folder: Path, draw) -> str:
    file = draw(st.sampled_from(sorted(folder.iterdir())))
    kind = draw(st.sampled_from(["delete", "empty", "folder", "bytes"]))
    if kind == "bytes":
        raw = file.read_bytes()
        cut = draw(st.integers(0, min(len(raw), 200)))
        file.write_bytes(raw[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80\x80"])) + raw[cut:])
    elif kind == "empty":
        file.write_bytes(b"")
    else:
        file.unlink()
        if kind == "folder":
            file.mkdir()
    return f"file {kind} {file.name}"


ADDED_TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def edit_added_tokens_decoder(folder: Path, draw) -> str:
    """The folder as transformers 4 saved it: tokenizer_config.json holding an added_tokens_decoder of tokenizer.json's
    added tokens (AutoTokenizer then reads no special_tokens_map.json), that edited; then, or not, the map or the
    config edited as the other edits do (a map naming other tokens than the config: read or not)."""
    config = json.loads((folder / CONFIG).read_text())
    added = json.loads((folder / TOKENIZER_JSON).read_text())["added_tokens"]
    decoder = {str(t["id"]): {k: t[k] for k in ADDED_TOKEN_FIELDS} for t in added}
    kind = draw(st.sampled_from(["as_saved", "new_token", "property", "id", "dropped", "only_content", "no_content",
                                 "value", "key", "whole"]))
    key = draw(st.sampled_from(sorted(decoder)))
    if kind == "new_token":
        decoder[draw(st.sampled_from([key, "300", "70000"]))] = {**decoder[key], "content": "<new>"}
    elif kind == "property":
        name = draw(st.sampled_from(ADDED_TOKEN_FIELDS[1:]))
        decoder[key][name] = draw(st.sampled_from([not decoder[key][name], 1, "yes", None]))
    elif kind == "id":
        decoder[draw(st.sampled_from(["5", "299", " 1", "+1", "1_0", "-1"]))] = decoder.pop(key)
    elif kind == "dropped":
        decoder.pop(key)
    elif kind == "only_content":
        decoder[key] = {"content": decoder[key]["content"]}
    elif kind == "no_content":
        decoder[key] = draw(st.sampled_from([{}, {"special": True}, {"content": None}, {"content": ""}]))
    elif kind == "value":
        decoder[key] = draw(st.sampled_from([decoder[key]["content"], 5, None, [decoder[key]["content"]]]))
    elif kind == "key":
        decoder[draw(st.sampled_from(["x", "", "1.0"]))] = decoder.pop(key)
    config["added_tokens_decoder"] = draw(st.sampled_from([decoder] * 5 + [None, [], {}, "x"])) if kind == "whole" \
        else decoder
    # SmolLM2's class, which AutoTokenizer builds from the vocabulary with the decoder's added tokens, or the saved one
    config["tokenizer_class"] = draw(st.sampled_from(["GPT2Tokenizer", config.get("tokenizer_class")]))
    (folder / CONFIG).write_text(json.dumps(config))
    then = draw(st.sampled_from(["nothing", SPECIAL_MAP, CONFIG]))
    return f"added_tokens_decoder {kind} then " + (then if then == "nothing" else edit_hf_config(then, folder, draw))


EDITS = {"tokenizer.json": edit_tokenizer_json,
         "tokenizer_config.json": lambda folder, draw: edit_hf_config(CONFIG, folder, draw),
         "special_tokens_map.json": lambda folder, draw: edit_hf_config(SPECIAL_MAP, folder, draw),
         "added_tokens_decoder": edit_added_tokens_decoder,
         "file": edit_file}


# --- the references -----------------------------------------------------------------------------------------------

def tokenizers_reading(folder: Path):
    """`tokenizers`' own Tokenizer of FOLDER's tokenizer.json, or None where it refuses it."""
    try:
        return Tokenizer.from_file(str(folder / TOKENIZER_JSON))
    except Exception:  # noqa: BLE001 (whatever it raises is a refusal)
        return None


def auto_reading(folder: Path):
    """transformers' AutoTokenizer of FOLDER, or None where it refuses it or then fails to tokenize TEXT (a
    model_max_length of "8192" it loads, then compares a length with)."""
    try:
        auto = transformers.AutoTokenizer.from_pretrained(folder)
        auto(TEXT)
        return auto
    except Exception:  # noqa: BLE001 (whatever it raises is a refusal)
        return None


def changes_tokens(auto, reference: Tokenizer) -> bool:
    """AutoTokenizer made special tokens that tokenizer.json does not hold as special (added) ones, the ones its
    config files name: new ids past the vocabulary, or text holding them tokenized otherwise."""
    added = {token.content for token in reference.get_added_tokens_decoder().values()}
    return bool(set(auto.get_vocab()) - set(reference.get_vocab(with_added_tokens=True))
                or set(auto.all_special_tokens) - added)


def assert_same_special_tokens(source, shipped, folder: Path, said: str) -> None:
    """SHIPPED (the export's folder as AutoTokenizer loads it) has SOURCE's special tokens with their ids, and one more
    where the export wrote the tokenizer_config.json FOLDER lacks: its EOS, named as BOS, EOS and UNK."""
    ids = {token: source.convert_tokens_to_ids(token) for token in source.all_special_tokens}
    assert {token: shipped.convert_tokens_to_ids(token) for token in ids} == ids, said
    more = set(shipped.all_special_tokens) - set(ids)
    assert not more if (folder / CONFIG).is_file() else more <= {shipped.eos_token}, (said, more)
    assert shipped(TEXT)["input_ids"] == source(TEXT)["input_ids"], said


# --- the readers --------------------------------------------------------------------------------------------------

def check_preprocess(world, work: Path, spec: str, said: str, reference) -> Optional[int]:
    """The store's EOS (the id the data pipeline ends documents with), or None where preprocess refused."""
    prefix = work / "store"
    code, _, err = call_and_check(load_tool("preprocess").main,
                                  [("text", "--input"), ("text", str(world["text"])), ("text", "--tokenizer"),
                                   ("text", spec), ("text", "--output-prefix"), ("text", str(prefix)),
                                   ("text", "--workers"), ("text", "1"), ("text", "--no-progress")],
                                  {}, work, writes=True)
    if code == 0:
        event("preprocess: written")
        assert reference is not None, (said, "tokenized with a tokenizer.json tokenizers refuses")
        meta = json.loads(Path(f"{prefix}.meta.json").read_text())
        (document,) = read_megatron_plainly(prefix)[1]
        assert document.tolist() == reference.encode(TEXT).ids + [meta["tokenizer"]["eos_id"]], said
        assert reference.id_to_token(meta["tokenizer"]["eos_id"]) == meta["tokenizer"]["eos_token"], said
        return meta["tokenizer"]["eos_id"]
    line = err.strip().splitlines()[-1]
    event("preprocess: refused")
    assert code == 2 and spec in line, (said, line)
    assert not list(work.glob("store*")), (said, "a refused preprocess left output")
    if reference is not None:  # tokenizers reads it: a refusal README documents
        assert any(reason in line for reason in DOCUMENTED), (said, line)
    return None


def check_export(world, work: Path, folder: Path, said: str, reference, store_eos: Optional[int]) -> None:
    output = work / "hf"
    code, _, err = call_and_check(load_tool("convert_to_hf").main,
                                  [("text", "--checkpoint"), ("text", str(world["run"])), ("text", "--output"),
                                   ("text", str(output)), ("text", "--tokenizer"), ("text", str(folder)),
                                   ("text", "--dtype"), ("text", "bfloat16"), ("text", "--no-progress")],
                                  {}, work, writes=True)
    source = auto_reading(folder) if reference is not None else None
    if code == 0:
        event("export: written")
        assert reference is not None, (said, "shipped a tokenizer.json tokenizers refuses")
        shipped = auto_reading(output)
        assert shipped is not None, (said, "exported a tokenizer AutoTokenizer does not load")
        assert not changes_tokens(shipped, reference), (said, "exported a tokenizer AutoTokenizer changes")
        assert shipped(TEXT)["input_ids"] == reference.encode(TEXT).ids, said
        if source is not None:  # the folder shipped loads as the one given, its special tokens (extra ones too)
            assert_same_special_tokens(source, shipped, folder, said)
        config = json.loads((output / "config.json").read_text())
        for key in ("bos", "eos"):
            ours, theirs = config[f"{key}_token_id"], getattr(shipped, f"{key}_token_id")
            # AutoTokenizer reporting none (a config naming none, or no tokenizer_config.json at all): the export
            # says the EOS the data pipeline ends documents with (README), the store's
            assert ours == (store_eos if theirs is None else theirs), (said, key, ours, theirs, store_eos)
            if source is not None and getattr(source, f"{key}_token_id") is not None:
                assert ours == getattr(source, f"{key}_token_id"), (said, key)
        return
    line = err.strip().splitlines()[-1]
    event("export: refused")
    assert code == 2 and str(folder) in line, (said, line)
    assert not output.exists(), (said, "a refused export left its output")
    if source is not None and not changes_tokens(source, reference):  # both references read it as it is
        assert any(reason in line for reason in DOCUMENTED), (said, line)


def check_run_tokenizer(world, folder: Path, spec: str, said: str) -> None:
    """The trainer's and the launch preflight's reading of data.tokenizer SPEC (it hashes the file; the export at the
    run's end ships it), against a store of the undamaged tokenizer: a note naming it when its tokenizer.json holds
    other bytes than the store's, or holds none (the export will ship none); no note when it is the same file."""
    from nanotronix.data import open_store, tokenizer_note
    note = tokenizer_note({"store": open_store(world["store"])}, spec)
    file = folder / TOKENIZER_JSON
    same = file.is_file() and file.read_bytes() == (world["tiny"] / TOKENIZER_JSON).read_bytes()
    assert (note is None) == same and (same or f"data.tokenizer {spec} " in note), (said, note)


def check_import_record(world, work: Path, folder: Path, said: str, exported: bool) -> None:
    """convert_from_hf's record of the folder's tokenizer (step 0's manifest, data.tokenizer: the folder when it holds
    a tokenizer.json; no weights imported here) and what an export of that import ships from it: the tokenizer the
    --tokenizer export shipped (EXPORTED), or no tokenizer files and one warning naming the folder."""
    from nanotronix.checkpoint.hf_export import _write_tokenizer_and_configs
    from nanotronix.checkpoint.hf_tokenizer_files import TOKENIZER_FILES
    from nanotronix.checkpoint.hf_import import _import_manifest
    manifest = _import_manifest(folder, {}, TINY)
    recorded = manifest["config"]["data"].get("tokenizer")
    assert recorded == (str(folder.resolve()) if (folder / TOKENIZER_JSON).is_file() else None), (said, recorded)
    output, lines = work / "imported_hf", []
    output.mkdir()
    info = _write_tokenizer_and_configs(output, None, manifest, manifest["source"]["hf"],
                                        dataclasses.replace(TINY, vocab_size=MODEL_VOCAB), "float32", lines.append)
    # the ids config.json then defaults, said once no tokenizer is shipped; the tokenizer_class replaced, said as
    # the --tokenizer export says it (compared below: the same files)
    lines = [line for line in lines if not line.startswith("warning: no tokenizer, so bos_token_id")
             and not (line.startswith("note: ") and "names PreTrainedTokenizerFast instead" in line)]
    if recorded is None or not exported:
        assert info is None and not any((output / name).exists() for name in TOKENIZER_FILES), said
        assert recorded is None or (len(lines) == 1 and lines[0].startswith("warning: tokenizer files not written (")
                                    and str(folder) in lines[0]), (said, lines)
    else:
        assert info is not None and not lines, (said, lines)
        assert {p.name: p.read_bytes() for p in output.iterdir() if p.name in TOKENIZER_FILES} == \
            {p.name: p.read_bytes() for p in (work / "hf").iterdir() if p.name in TOKENIZER_FILES}, said


def damaged_folder_is_read_as_the_references_read_it(world, original: Path, data) -> None:
    kind = data.draw(st.sampled_from(sorted(EDITS)), "edit")
    work = Path(tempfile.mkdtemp(dir=world["root"]))
    try:
        folder = work / "tok"
        shutil.copytree(original, folder)
        said = EDITS[kind](folder, data.draw)
        event(said)
        # the folder, or its tokenizer.json (the files beside it read the same way)
        spec = str(folder / TOKENIZER_JSON) if data.draw(st.booleans(), "spec is the file") else str(folder)
        reference = tokenizers_reading(folder)
        store_eos = check_preprocess(world, work, spec, said, reference)
        check_export(world, work, folder, said, reference, store_eos)
        check_run_tokenizer(world, folder, spec, said)
        check_import_record(world, work, folder, said, (work / "hf").is_dir())
    finally:
        shutil.rmtree(work, ignore_errors=True)


@settings(PROPERTY, max_examples=120)
@given(data=st.data())
def test_damaged_tiny_tokenizer_folders(world, data):
    damaged_folder_is_read_as_the_references_read_it(world, world["tiny"], data)


# its 2 MB tokenizer.json: ~1.4 s an example alone; the tiny folder's 120 walk the same damages
@settings(PROPERTY, max_examples=10)
@given(data=st.data())
def test_damaged_smollm2_tokenizer_folders(world, smollm2, data):
    damaged_folder_is_read_as_the_references_read_it(world, smollm2, data)
