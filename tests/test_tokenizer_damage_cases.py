"""The cases tests/test_tokenizer_damage_properties.py's property found (each a bug once), each held on its own: the
same tiny tokenizer folder (its `world` fixture) edited one way, read by tools/preprocess.py and
tools/convert_to_hf.py --tokenizer, against `tokenizers` and transformers' AutoTokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer

from helpers import load_tool, read_megatron_plainly
import test_tokenizer_damage_properties as damage
from test_tokenizer_damage_properties import (CHAT, CONFIG, MODEL_VOCAB, SPECIAL_MAP, TEXT, TOKENIZER_JSON,
                                              auto_reading, changes_tokens)

world = damage.world  # the fixture: the property's tiny tokenizer folder, checkpoint and store, made for this module


def edited(world, tmp_path: Path, name: str, edit) -> Path:
    """A copy of the tiny tokenizer's folder whose file NAME (a JSON object) EDIT changed in place."""
    folder = tmp_path / "tok"
    shutil.copytree(world["tiny"], folder)
    value = json.loads((folder / name).read_text())
    edit(value)
    (folder / name).write_text(json.dumps(value))
    return folder


def export(world, tmp_path: Path, folder: Path, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = load_tool("convert_to_hf").main(["--checkpoint", str(world["run"]), "--output", str(tmp_path / "hf"),
                                           "--tokenizer", str(folder), "--no-progress"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("token_id", [70_000, 2 ** 31])
def test_an_id_past_the_token_count_is_stored_or_refused(world, tmp_path, capsys, token_id):
    """A tokenizer.json whose vocab gives a token the text uses an id past its token count: its store was uint16
    (sized by the count), and preprocess ended in numpy's OverflowError traceback; the export shipped it with a
    300-token vocabulary to a model whose embedding has no row for 70000. Now the store holds the ids tokenizers
    gives, and an id past a store's int32 is one line."""
    folder = edited(world, tmp_path, TOKENIZER_JSON, lambda t: t["model"]["vocab"].update({"\u0120": token_id}))
    reference = Tokenizer.from_file(str(folder / TOKENIZER_JSON))
    assert token_id in reference.encode(TEXT).ids
    capsys.readouterr()
    code = load_tool("preprocess").main(["--input", str(world["text"]), "--tokenizer", str(folder),
                                         "--output-prefix", str(tmp_path / "store"), "--workers", "1",
                                         "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    if token_id < 2 ** 31:
        assert code == 0, err
        assert read_megatron_plainly(tmp_path / "store")[1][0].tolist() == reference.encode(TEXT).ids + [0]
        code, err = export(world, tmp_path, folder, capsys)
        assert code == 2 and err == [f"error: tokenizer {folder} has {token_id + 1} tokens, more than the model's "
                                     f"vocabulary ({MODEL_VOCAB}): not the model's tokenizer"]
    else:
        assert code == 2 and err == [f"error: tokenizer {folder / TOKENIZER_JSON}: gives token ids up to {token_id}, "
                                     f"past the largest a token store holds ({2 ** 31 - 1})"], err
        assert not list(tmp_path.glob("store*"))


@pytest.mark.parametrize("name, data, said", [
    (CONFIG, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply to be read"),
    (CONFIG, b'{"eos_token": "<|im', "not JSON (Unterminated string starting at: line 1 column 15 (char 14))"),
    (CONFIG, b"[1, 2]", "a JSON array, not an object"),
    (CONFIG, b'{"model_max_length": ' + b"9" * 5000 + b"}",  # said "not a JSON object" before
     "holds an integer of 5000 digits, more than Python's JSON reader (and so transformers) reads (4300)"),
    (SPECIAL_MAP, b'{"eos_token": "\xff"}', "not UTF-8 text (byte 15)"),
    (CHAT, b"\xff{{ messages }}", "not UTF-8 text (byte 0)"),
    (SPECIAL_MAP, b'{"additional_special_tokens": {"image_token": "<|endoftext|>"}}',  # exported (random seed 3401)
     "additional_special_tokens: a mapping, read as one token, not a list of tokens (AutoTokenizer cannot read it; a "
     "mapping of named tokens goes under extra_special_tokens)"),
    (CONFIG, b'{"model_max_length": "8192"}', 'model_max_length: "8192" is not a number (AutoTokenizer loads it, '
                                              "then fails comparing a text's length with it)"),
    (SPECIAL_MAP, b'{"chat_template": ["x"]}', 'chat_template: a list whose items are not all {"name": ..., '
                                               '"template": ...} (AutoTokenizer cannot read it)'),
])
def test_hf_files_autotokenizer_cannot_read_are_refused(world, tmp_path, capsys, name, data, said):
    """The export copied the HF files beside tokenizer.json as they were: a folder AutoTokenizer cannot load (or
    load and then tokenize with) came out of an export that said it succeeded; a tokenizer_config.json nested past
    json's recursion was a RecursionError traceback. Now one line naming the file."""
    folder = tmp_path / "tok"
    shutil.copytree(world["tiny"], folder)
    (folder / name).write_bytes(data)
    assert auto_reading(folder) is None  # the reference refuses it too
    code, err = export(world, tmp_path, folder, capsys)
    assert code == 2 and err == [f"error: {folder / name}: {said}"], err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name, edit, token", [
    (CONFIG, lambda c: c.update(pad_token="<nope>"), "<nope>"),
    (SPECIAL_MAP, lambda c: c.update(bos_token="<nope>"), "<nope>"),
    (TOKENIZER_JSON, lambda t: t.update(added_tokens=t["added_tokens"][1:]), "<|endoftext|>"),  # unk_token's
])
def test_special_tokens_that_tokenizer_json_lacks_are_refused(world, tmp_path, capsys, name, edit, token):
    """A config file naming a special token that tokenizer.json does not hold as one: AutoTokenizer adds it (a new
    id past the vocabulary; as bos_token, the id it then reports as BOS) or makes a plain token special (text
    holding it tokenized otherwise than the store); the export shipped it, config.json saying the data EOS (0) for
    a BOS the folder it shipped reported as 302."""
    folder = edited(world, tmp_path, name, edit)
    source = auto_reading(folder)
    assert changes_tokens(source, Tokenizer.from_file(str(folder / TOKENIZER_JSON)))
    code, err = export(world, tmp_path, folder, capsys)
    named = folder / (SPECIAL_MAP if name == TOKENIZER_JSON else name)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {named}: ") and \
        f"{json.dumps(token)} is not a special token of its tokenizer.json" in err[0], err


def test_special_tokens_map_names_win_without_a_tokenizer_config(world, tmp_path, capsys):
    """With no tokenizer_config.json, the export writes one naming the EOS (<|endoftext|>) as bos_token, but ships
    special_tokens_map.json, whose bos_token (<|im_start|>) AutoTokenizer reads over it: config.json said 0."""
    folder = tmp_path / "tok"
    shutil.copytree(world["tiny"], folder)
    (folder / CONFIG).unlink()
    code, err = export(world, tmp_path, folder, capsys)
    assert code == 0, err
    shipped = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (shipped.bos_token_id, shipped.eos_token_id) == \
        (300, 301)


def test_no_end_of_document_token_is_one_line_naming_the_file(world, tmp_path, capsys):
    """A tokenizer with no EOS candidate and a tokenizer_config.json that is not an object: an AttributeError
    traceback (the config read as a dict); and the line did not name the tokenizer."""
    def rename(tokenizer):
        tokenizer["model"]["vocab"]["<eot>"] = tokenizer["model"]["vocab"].pop("<|endoftext|>")
        tokenizer["added_tokens"][0]["content"] = "<eot>"

    folder = edited(world, tmp_path, TOKENIZER_JSON, rename)
    (folder / CONFIG).write_text("[1]")
    capsys.readouterr()
    code = load_tool("preprocess").main(["--input", str(world["text"]), "--tokenizer", str(folder),
                                         "--output-prefix", str(tmp_path / "store"), "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(
        f"error: tokenizer {folder / TOKENIZER_JSON}: has no end-of-document token"), err


@pytest.mark.parametrize("name, key, value, said", [
    (CONFIG, "additional_special_tokens", ["<|im_end|>", "<nope>"], '"<nope>" is not a special token'),
    (CONFIG, "extra_special_tokens", ["e"], '"e" is not a special token'),
    (CONFIG, "extra_special_tokens", {"image_token": "<nope>"}, '"<nope>" is not a special token'),
    (CONFIG, "image_token", "<nope>", '"<nope>" is not a special token'),
    (SPECIAL_MAP, "additional_special_tokens", ["<nope>"], '"<nope>" is not a special token'),
    (CONFIG, "extra_special_tokens", [5], "5 is not a token"),
    (SPECIAL_MAP, "additional_special_tokens", [{"content": "<|im_end|>"}], 'is not a token'),
    (CONFIG, "extra_special_tokens", "<|im_end|>", "a string, not a list or mapping of tokens"),
])
def test_extra_special_tokens_autotokenizer_changes_or_refuses_are_refused(world, tmp_path, capsys, name, key, value,
                                                                           said):
    """additional_special_tokens / extra_special_tokens (a list, or a mapping of named tokens) and a model's own
    *_token names were not checked: the export shipped a folder AutoTokenizer cannot load, or one where it adds a
    token past the vocabulary (<nope>) or makes a plain one special ("e": text tokenized otherwise than the store).
    Now one line naming the file."""
    folder = edited(world, tmp_path, name, lambda c: c.update({key: value}))
    source = auto_reading(folder)
    assert source is None or changes_tokens(source, Tokenizer.from_file(str(folder / TOKENIZER_JSON)))
    code, err = export(world, tmp_path, folder, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {folder / name}: {key}") and said in err[0], err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name, key, value", [
    (CONFIG, "additional_special_tokens", ["<|im_start|>", "<|im_end|>"]),
    (CONFIG, "extra_special_tokens", ["<|im_end|>"] * 10 ** 5),
    (CONFIG, "extra_special_tokens", {"image_token": "<|im_start|>"}),
    (CONFIG, "extra_special_tokens", None),
    (SPECIAL_MAP, "additional_special_tokens", ["<|im_end|>", "<|im_end|>"]),
])
def test_extra_special_tokens_of_the_vocabulary_are_shipped(world, tmp_path, capsys, name, key, value):
    """Extra special tokens that tokenizer.json holds as special ones: the shipped folder loads with the same
    special tokens and ids as the source, and tokenizes a text holding them as tokenizer.json does."""
    folder = edited(world, tmp_path, name, lambda c: c.update({key: value}))
    code, err = export(world, tmp_path, folder, capsys)
    assert code == 0, err
    source, shipped = auto_reading(folder), auto_reading(tmp_path / "hf")
    assert (shipped.all_special_tokens, shipped.all_special_ids) == (source.all_special_tokens,
                                                                     source.all_special_ids)
    assert shipped(TEXT)["input_ids"] == Tokenizer.from_file(str(folder / TOKENIZER_JSON)).encode(TEXT).ids


@pytest.mark.parametrize("named", [{}, {"eos_token": "<|im_end|>"}, {"bos_token": "<|im_start|>"}])
def test_ids_autotokenizer_reports_as_none_are_the_data_eos(world, tmp_path, capsys, named):
    """README: a BOS or EOS that AutoTokenizer reports as none (the tokenizer's files name none) is the EOS the data
    pipeline ends documents with (<|endoftext|>, the store's) in config.json and generation_config.json."""
    folder = tmp_path / "tok"
    shutil.copytree(world["tiny"], folder)
    for name in (CONFIG, SPECIAL_MAP):
        config = json.loads((folder / name).read_text())
        for key in ("bos_token", "eos_token"):
            config.pop(key, None)
        (folder / name).write_text(json.dumps({**config, **named}))
    code, err = export(world, tmp_path, folder, capsys)
    assert code == 0, err
    shipped = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    data_eos = Tokenizer.from_file(str(folder / TOKENIZER_JSON)).token_to_id("<|endoftext|>")
    for file in ("config.json", "generation_config.json"):
        written = json.loads((tmp_path / "hf" / file).read_text())
        for key in ("bos", "eos"):
            reported = getattr(shipped, f"{key}_token_id")
            assert written[f"{key}_token_id"] == (data_eos if reported is None else reported), (file, key)
    assert [shipped.bos_token_id, shipped.eos_token_id].count(None) == 2 - len(named)


def test_a_run_tokenizer_path_holding_no_tokenizer_json_is_noted(world, tmp_path):
    """data.tokenizer a folder whose tokenizer.json was deleted, or a path that is not there: the trainer and the
    launch preflight said nothing (the hash they compare was None), and the export at the run's end shipped no
    tokenizer, in a warning then. Now a start note; a Hub id is still not looked up."""
    from nanotronix.data import open_store, tokenizer_note
    folder = tmp_path / "tok"
    shutil.copytree(world["tiny"], folder)
    (folder / TOKENIZER_JSON).unlink()
    stores = {"store": open_store(world["store"])}
    for spec in (str(folder), str(folder / TOKENIZER_JSON), str(tmp_path / "missing"), "./missing.json"):
        note = tokenizer_note(stores, spec)
        assert note and note.startswith(f"data.tokenizer {spec} holds no tokenizer.json"), (spec, note)
    assert tokenizer_note(stores, str(world["tiny"])) is None
    assert tokenizer_note(stores, "HuggingFaceTB/SmolLM2-135M") is None


def decoder_of(folder: Path) -> dict:
    """tokenizer_config.json's added_tokens_decoder as transformers 4 saved it: tokenizer.json's added tokens."""
    added = json.loads((folder / TOKENIZER_JSON).read_text())["added_tokens"]
    return {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added}


def with_decoder(world, tmp_path: Path, edit) -> Path:
    """The tiny folder as transformers 4 saved it (an added_tokens_decoder in tokenizer_config.json), EDIT changing
    the decoder in place."""
    folder = edited(world, tmp_path, CONFIG, lambda c: c.update(added_tokens_decoder=decoder_of(world["tiny"])))
    config = json.loads((folder / CONFIG).read_text())
    edit(config["added_tokens_decoder"])
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("edit, said", [
    (lambda d: d.update({"300": {**d["300"], "content": "<new>"}}),
     '"<new>" is not an added token of its tokenizer.json (AutoTokenizer would add it, past the vocabulary)'),
    (lambda d: d.update({"300": {**d["300"], "content": "a"}}),  # said "past the vocabulary", where "a" is
     '"a" is a token of its tokenizer.json\'s vocabulary, not an added one (AutoTokenizer would make it one, '
     "splitting text at it otherwise than the store)"),
    (lambda d: d["0"].update(lstrip=True),
     '"<|endoftext|>" differs from tokenizer.json\'s (lstrip true, not false): AutoTokenizer re-adds it so, '
     "tokenizing text otherwise than the store"),
    (lambda d: d.update({"0": "<|endoftext|>"}),
     '"0": a JSON string, not a token\'s fields (AutoTokenizer cannot read it)'),
    (lambda d: d.update({"x": d.pop("0")}), '"x" is not a token id (AutoTokenizer cannot read it)'),
])
def test_an_added_tokens_decoder_other_than_tokenizer_json_is_refused(world, tmp_path, capsys, edit, said):
    """A folder transformers 4 saved holds the added tokens twice, tokenizer.json's and tokenizer_config.json's
    added_tokens_decoder, which AutoTokenizer adds again with their own properties: one tokenizer.json lacks is a new
    id past the vocabulary; lstrip makes text around it tokenize otherwise; an entry it cannot read fails the load.
    The export shipped them, saying it succeeded (found by the property's added_tokens_decoder edits)."""
    folder = with_decoder(world, tmp_path, edit)
    source = auto_reading(folder)
    reference = Tokenizer.from_file(str(folder / TOKENIZER_JSON))
    assert source is None or changes_tokens(source, reference) or \
        source(" a <|endoftext|>")["input_ids"] != reference.encode(" a <|endoftext|>").ids  # what the refusal saves
    code, err = export(world, tmp_path, folder, capsys)
    assert code == 2 and err == [f"error: {folder / CONFIG}: added_tokens_decoder: {said}"], err
    assert not (tmp_path / "hf").exists()


def test_an_added_tokens_decoder_lacking_an_added_token_is_refused(world, tmp_path, capsys):
    """A decoder without one of tokenizer.json's added tokens (here one no special-token key names): AutoTokenizer
    builds a tokenizer_class such as GPT2Tokenizer (SmolLM2's) from tokenizer.json's vocabulary and merges and adds
    the decoder's tokens only, so the one left out is no longer one token; the export shipped it, saying it
    succeeded."""
    folder = tmp_path / "tok"
    shutil.copytree(world["tiny"], folder)
    reference = Tokenizer.from_file(str(folder / TOKENIZER_JSON))
    reference.add_special_tokens(["<tool>"])
    reference.save(str(folder / TOKENIZER_JSON))
    config = json.loads((folder / CONFIG).read_text())
    decoder = decoder_of(folder)
    del decoder[str(reference.token_to_id("<tool>"))]
    (folder / CONFIG).write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer",
                                             "added_tokens_decoder": decoder}))
    source = auto_reading(folder)
    assert source("a <tool> b")["input_ids"] != reference.encode("a <tool> b").ids  # what the refusal saves
    code, err = export(world, tmp_path, folder, capsys)
    assert code == 2 and err == [f"error: {folder / CONFIG}: added_tokens_decoder: lacks \"<tool>\", an added token of "
                                 "its tokenizer.json (AutoTokenizer builds a tokenizer_class such as GPT2Tokenizer "
                                 "without it, tokenizing text otherwise than the store)"], err
    assert not (tmp_path / "hf").exists()


def test_special_tokens_map_is_not_read_beside_an_added_tokens_decoder(world, tmp_path, capsys):
    """AutoTokenizer (transformers 5) reads special_tokens_map.json only where tokenizer_config.json holds no
    added_tokens_decoder: the export took the map's eos_token over the config's, and its config.json named another
    EOS than the shipped tokenizer's (generate() stopping at another token); a damaged map, which AutoTokenizer does
    not open, was refused."""
    folder = with_decoder(world, tmp_path, lambda d: None)
    (folder / SPECIAL_MAP).write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    code, err = export(world, tmp_path, folder, capsys)
    assert code == 0, err
    shipped = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (shipped.bos_token_id, shipped.eos_token_id) == \
        (300, 301)  # <|im_start|> and <|im_end|>, the config's
    shutil.rmtree(tmp_path / "hf")
    (folder / SPECIAL_MAP).write_text('{"eos_token": ')
    assert export(world, tmp_path, folder, capsys)[0] == 0 and auto_reading(tmp_path / "hf") is not None
