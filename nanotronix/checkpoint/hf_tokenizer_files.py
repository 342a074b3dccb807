"""The tokenizer files a Hugging Face export ships beside its weights (what checkpoint.hf_export calls).

The run's tokenizer.json, and the HF config files beside it, are copied only once they read as transformers'
AutoTokenizer (the release the test extra pins) reads them, since the exported folder must load and tokenize text as
the token stores were tokenized: these checks mirror what AutoTokenizer does with each file (which it reads, which
wins, what it adds or refuses) — transformers is a test reference here, not a dependency of the export, so they are
written out rather than delegated. What these rules cannot tell, how the class tokenizer_config.json names tokenizes
text, is checked by loading the folder where transformers is installed (hf_tokenizer_probes).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from nanotronix.convert.hf_mapping import read_json_object
from nanotronix.errors import UserError, json_kind


def write_tokenizer_files(spec: str, folder: Path, max_length: int) -> tuple[Any, Optional[int], Optional[int]]:
    """Copy the run's tokenizer (tokenizer.json and, when beside it, its HF config files) once they read as
    AutoTokenizer reads them; return its info and the BOS and EOS ids the shipped folder names (None: none named)."""
    from nanotronix.data import load_tokenizer

    tokenizer, info = load_tokenizer(spec)
    source = Path(info.file)
    shipped = {extra: source.parent / extra for extra in TOKENIZER_FILES[1:] if (source.parent / extra).is_file()}
    specials = _special_tokens(tokenizer, shipped)
    shutil.copyfile(source, folder / "tokenizer.json")
    for extra, file in shipped.items():
        shutil.copyfile(file, folder / extra)
    if "tokenizer_config.json" not in shipped:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                  "clean_up_tokenization_spaces": False}
        if info.eos_id in tokenizer.get_added_tokens_decoder():  # naming another would make it special
            config.update(bos_token=info.eos_token, eos_token=info.eos_token, unk_token=info.eos_token)
            specials = {"bos_token": info.eos_id, "eos_token": info.eos_id, **specials}  # the map's names win
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return info, specials.get("bos_token"), specials.get("eos_token")


# chat_template.jinja: where transformers (>= 4.50) saves a tokenizer's chat template (an instruct model's)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# The tokens transformers' tokenizers hold as attributes; AutoTokenizer makes each one named a special token: one
# tokenizer.json lacks, a new token past its vocabulary (an id the model never trained on); one it holds as a plain
# token, one that text holding it is no longer split into (the store's ids for that text are others)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _special_tokens(tokenizer, shipped: dict[str, Path]) -> dict[str, Optional[int]]:
    """The id of each special token the HF files beside a tokenizer.json name, as AutoTokenizer reads them
    (special_tokens_map.json's over tokenizer_config.json's, the map read only where tokenizer_config.json holds no
    added_tokens_decoder, as there; a string, or an AddedToken dict's "content"; null: none), after checking that
    AutoTokenizer can read the files at all and that the decoder holds tokenizer.json's added tokens as they are
    there: a file it cannot read, a token of another type, one that is not a special (added) token of
    tokenizer.json (named, an extra one or a model's own *_token), a model_max_length that is not a number, or a list
    of chat templates that are not named ones, is a UserError naming the file (an export shipping it would not load
    or tokenize, or would tokenize otherwise than the store)."""
    named: dict[str, tuple[Path, Any]] = {}
    extra: list[tuple[Path, str, Any]] = []  # (file, where, value): the other tokens AutoTokenizer makes special
    configs = {"tokenizer_config.json": _json_object(shipped["tokenizer_config.json"])} \
        if "tokenizer_config.json" in shipped else {}
    if "added_tokens_decoder" in configs.get("tokenizer_config.json", {}):  # a folder transformers 4 saved
        _check_added_tokens_decoder(shipped["tokenizer_config.json"],
                                    configs["tokenizer_config.json"]["added_tokens_decoder"], tokenizer)
    elif "special_tokens_map.json" in shipped:  # AutoTokenizer reads it only without an added_tokens_decoder
        configs["special_tokens_map.json"] = _json_object(shipped["special_tokens_map.json"])
    for name, config in configs.items():  # the map's names win
        named.update({key: (shipped[name], value) for key, value in config.items() if key in SPECIAL_TOKENS})
        extra += [(shipped[name], label, value) for key, item in config.items()
                  for label, value in _extra_tokens(shipped[name], key, item)]
        if not isinstance(config.get("model_max_length"), (int, float, type(None))):
            raise UserError(f"{shipped[name]}: model_max_length: {json.dumps(config['model_max_length'])} is "
                            "not a number (AutoTokenizer loads it, then fails comparing a text's length with it)")
        # chat_template.jinja takes the place of tokenizer_config.json's (not of special_tokens_map.json's)
        templates = None if name == "tokenizer_config.json" and "chat_template.jinja" in shipped else \
            config.get("chat_template")
        if isinstance(templates, list) and not all(isinstance(t, dict) and {"name", "template"} <= t.keys()
                                                   for t in templates):
            raise UserError(f"{shipped[name]}: chat_template: a list whose items are not all "
                            '{"name": ..., "template": ...} (AutoTokenizer cannot read it)')
    if "chat_template.jinja" in shipped:
        _utf8_text(shipped["chat_template.jinja"])
    added = {token.content: index for index, token in tokenizer.get_added_tokens_decoder().items()}
    ids: dict[str, Optional[int]] = {}
    for key, (file, value) in named.items():
        ids[key] = None if value is None else added[_added_token(file, key, value, added)]
    for file, where, value in extra:
        _added_token(file, where, value, added)
    return ids


# The keys AutoTokenizer reads as a list (or a mapping of named tokens) of special tokens besides the named ones;
# transformers 5 reads the older name as the newer
_EXTRA_TOKEN_LISTS = ("additional_special_tokens", "extra_special_tokens")


def _extra_tokens(file: Path, key: str, value: Any) -> list[tuple[str, Any]]:
    """(where, value) of each special token besides SPECIAL_TOKENS that FILE's KEY holding VALUE makes, as
    AutoTokenizer reads it: an extra-token list's items, a mapping's values (named tokens of the model: where is
    KEY.NAME), a string under another *_token key (a model's own, an image_token: AutoTokenizer makes it special
    too); a UserError for an extra-token value it cannot read (neither null, a list nor a mapping; in
    special_tokens_map.json, a mapping under the older name, which it reads as one AddedToken and then refuses as no
    list)."""
    if key in _EXTRA_TOKEN_LISTS:
        if isinstance(value, dict) and file.name == "special_tokens_map.json" and key == "additional_special_tokens":
            raise UserError(f"{file}: {key}: a mapping, read as one token, not a list of tokens (AutoTokenizer cannot "
                            "read it; a mapping of named tokens goes under extra_special_tokens)")
        if isinstance(value, dict):
            return [(f"{key}.{name}", token) for name, token in value.items()]
        if isinstance(value, list) or value is None:
            return [(key, token) for token in value or []]
        kind = {str: "a string", bool: "a boolean", int: "a number", float: "a number"}[type(value)]
        raise UserError(f"{file}: {key}: {kind}, not a list or mapping of tokens (AutoTokenizer cannot read it)")
    named = key.endswith("_token") and key not in SPECIAL_TOKENS
    return [(key, value)] if named and (isinstance(value, str) or _is_added_token(file, key, value)) else []


# The properties of an AddedToken (besides its content) that change how text around it is split, or whether it is
# special
_ADDED_TOKEN_PROPERTIES = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _check_added_tokens_decoder(file: Path, decoder: Any, tokenizer) -> None:
    """tokenizer_config.json's added_tokens_decoder (saved by transformers 4 beside tokenizer.json), read as
    AutoTokenizer (transformers 5.25) reads it: each entry, an id and the fields of a tokenizers AddedToken, is added
    to the tokenizer again with its own properties. A UserError naming FILE where it cannot read it, or where that
    adds a token tokenizer.json lacks (a new id past the vocabulary) or holds as a plain one of its vocabulary (text
    then split at it), or gives an added one other properties than tokenizer.json's (lstrip: the space before it
    swallowed; text tokenized otherwise than the store), or another id (the two files disagree), or where it lacks
    one of tokenizer.json's added tokens (a tokenizer_class such as GPT2Tokenizer, SmolLM2's, is built from
    tokenizer.json's vocabulary and merges with the decoder's tokens only: the one left out is no longer split out of
    text as one token). An entry without content adds nothing, as there."""
    from tokenizers import AddedToken

    where = f"{file}: added_tokens_decoder"
    if not isinstance(decoder, dict):
        raise UserError(f"{where}: a JSON {json_kind(decoder)}, not a mapping of ids to tokens (AutoTokenizer "
                        "cannot read it)")
    added = {token.content: (index, token) for index, token in tokenizer.get_added_tokens_decoder().items()}
    listed: set[str] = set()
    for key, fields in decoder.items():
        try:
            index = int(key)  # as transformers reads the key: " 5" and "1_0" are ids there too
        except ValueError:
            raise UserError(f"{where}: {json.dumps(key)} is not a token id (AutoTokenizer cannot read it)") from None
        if not isinstance(fields, dict):
            raise UserError(f"{where}: {json.dumps(key)}: a JSON {json_kind(fields)}, not a token's fields "
                            "(AutoTokenizer cannot read it)")
        try:  # the fields AddedToken knows (it ignores others, printing a line for each)
            token = AddedToken(**{k: v for k, v in fields.items() if k in ("content", *_ADDED_TOKEN_PROPERTIES)})
        except TypeError as e:
            raise UserError(f"{where}: {json.dumps(key)}: not a token AutoTokenizer reads ({e})") from None
        if not token.content:
            continue
        if token.content not in added and tokenizer.token_to_id(token.content) is not None:
            raise UserError(f"{where}: {json.dumps(token.content)} is a token of its tokenizer.json's vocabulary, not "
                            "an added one (AutoTokenizer would make it one, splitting text at it otherwise than the "
                            "store)")
        if token.content not in added:
            raise UserError(f"{where}: {json.dumps(token.content)} is not an added token of its tokenizer.json "
                            "(AutoTokenizer would add it, past the vocabulary)")
        known_index, known = added[token.content]
        differing = [f"{name} {json.dumps(getattr(token, name))}, not {json.dumps(getattr(known, name))}"
                     for name in _ADDED_TOKEN_PROPERTIES if getattr(token, name) != getattr(known, name)]
        if differing:
            raise UserError(f"{where}: {json.dumps(token.content)} differs from tokenizer.json's "
                            f"({', '.join(differing)}): AutoTokenizer re-adds it so, tokenizing text otherwise than "
                            "the store")
        if index != known_index:
            raise UserError(f"{where}: {json.dumps(token.content)} has id {index} there, {known_index} in its "
                            "tokenizer.json")
        listed.add(token.content)
    lacking = sorted((index, content) for content, (index, _) in added.items() if content not in listed)
    if lacking:
        raise UserError(f"{where}: lacks {json.dumps(lacking[0][1])}, an added token of its tokenizer.json "
                        "(AutoTokenizer builds a tokenizer_class such as GPT2Tokenizer without it, tokenizing text "
                        "otherwise than the store)")


def _is_added_token(file: Path, where: str, value: Any) -> bool:
    """VALUE (at WHERE in FILE) is an AddedToken dict that AutoTokenizer reads as its "content": one marked
    "__type": "AddedToken" in either file, any other dict of special_tokens_map.json but in an
    additional_special_tokens list or as a value of an extra-token mapping (WHERE is KEY.NAME)."""
    return isinstance(value, dict) and (value.get("__type") == "AddedToken" or (
        file.name == "special_tokens_map.json" and where != "additional_special_tokens" and "." not in where))


def _added_token(file: Path, where: str, value: Any, added: dict[str, int]) -> str:
    """The token VALUE (at WHERE in FILE) names, once it is a special (added) token of tokenizer.json; else a
    UserError naming the file."""
    token = value.get("content") if _is_added_token(file, where, value) else value
    if not isinstance(token, str):
        raise UserError(f"{file}: {where}: {json.dumps(value)} is not a token (a string, or an AddedToken's content)")
    if token not in added:
        raise UserError(f"{file}: {where}: {json.dumps(token)} is not a special token of its tokenizer.json "
                        "(AutoTokenizer would make it one, tokenizing text otherwise than the store)")
    return token


def _json_object(file: Path) -> dict:
    """read_json_object's object; a UserError naming the file for what it refuses."""
    try:
        return read_json_object(file)
    except RecursionError:
        raise UserError(f"{file}: nested too deeply to be read") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not JSON ({e})") from None
    except ValueError as e:  # another JSON value, or an integer too long to read
        raise UserError(f"{file}: {e}") from None


def _utf8_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not UTF-8 text (byte {e.start})") from None
