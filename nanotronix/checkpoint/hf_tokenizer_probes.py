"""The tokenizer folder a Hugging Face export ships tokenizes text as its tokenizer.json does (what the token stores
were tokenized with), checked by loading it with transformers' AutoTokenizer on a fixed set of probe texts, and by
comparing the normalizer and pre-tokenizer of the tokenizers pipeline it builds with tokenizer.json's.

Why a load, not a reading of the files as hf_tokenizer_files does: transformers 5 (5.25 here) builds the class
tokenizer_config.json names. PreTrainedTokenizerFast and TokenizersBackend (the class of a tokenizer_class it does not
know) load tokenizer.json whole. A class with a pipeline of its own (GPT2Tokenizer, SmolLM2's; Qwen2Tokenizer, ...:
each subclass of TokenizersBackend with an __init__ of its own; LlamaTokenizer too, but beside a byte-level
tokenizer.json, which it loads as TokenizersBackend) is rebuilt from tokenizer.json's vocabulary and merges alone,
with its own normalizer, pre-tokenizer and decoder (it keeps tokenizer.json's post-processor, padding and truncation):
text tokenizes otherwise wherever tokenizer.json's normalizer or pre-tokenizer differ from the class's — a Lowercase
normalizer, or SmolLM2's digit splitting before its byte-level pre-tokenizer ("x  =  1": GPT2Tokenizer's regex keeps
the space before the digit, then finds no "Ġ1" in a vocabulary trained on split digits). Which class AutoTokenizer
picks also depends on config.json and on transformers' own tables, so the folder is loaded as a user loads it, once
per export, rather than the rules written out here. Where the class named tokenizes otherwise, the export's copy of
tokenizer_config.json names PreTrainedTokenizerFast instead (in a note), which tokenizes as the store: SmolLM2's Hub
folder is shipped so. transformers is optional for the export: without it the check is not run, and the export says
so.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional

from nanotronix.errors import UserError

# Varied text that tokenizers' pipelines treat differently: prose, digits and numbers of many lengths, mixed case,
# runs of spaces (before digits too), tabs and newlines, code, accents, CJK and emoji, text that unicode normalizers
# change (decomposed accents: NFC; compatibility forms: NFKC) and other whitespace (no-break, em and ideographic
# spaces, a lone carriage return). Each added token of the tokenizer is probed inside text as well (probe_texts).
PROBES = (
    "The quick brown fox jumps over the lazy dog. It's 'quoted', isn't it?",
    "0 7 42 365 2024 31415 1234567 9876543210 3.14159 -12.5e-3 1,000,000 0x1F 2024-01-01 10:30:59",
    "x  =  1;  y   =   22;  z    =    333",
    "MiXeD CaSe WORDS, UPPER CASE, lower case, CamelCaseNames and snake_case_names",
    "   leading spaces, trailing spaces   ",
    "line one\nline two\r\n\tindented\n\n\n\t\ttwo tabs\n    four spaces",
    "def add(a, b):\n    return a + b  # the sum\n\nif (x != y && z >= 10) { return arr[i]; }\n",
    "café naïve résumé Ångström Straße ÉCOLE",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂👍🏽🇫🇷 and symbols © ™ ∑ ≠ → ½",
    "cafe\u0301 nai\u0308ve A\u030angstro\u0308m, \ufb01ne \uff26\uff35\uff2c\uff2c \u2460 x\u00b2 \u2126",
    "no-break\u00a0space em\u2003space ideographic\u3000space, lone\rreturn\u2028line separator",
)
_SHOWN_CHARS = 40  # of a differing probe, in the refusal line
# The parts of a tokenizers pipeline that change text before the model sees it. A class rebuilt with others than
# tokenizer.json's tokenizes otherwise on some text even where every probe agrees (a Replace normalizer of a pattern
# no probe holds), so they are compared too; transformers 5.25 keeps them when it loads tokenizer.json whole.
_TEXT_PARTS = ("normalizer", "pre_tokenizer")


def probe_texts(added_tokens: list[str]) -> list[str]:
    """PROBES, then each added token inside text: first, between words, beside spaces, digits and punctuation."""
    return [*PROBES, *(f"{token}a{token}b {token} 1{token}\n{token}.({token})," for token in added_tokens)]


WHOLE = "PreTrainedTokenizerFast"  # the tokenizer_class transformers builds by loading tokenizer.json whole


def check_tokenizes_as_tokenizer_json(folder: Path, named: Path, log: Callable[[str], None]) -> None:
    """FOLDER (an export's, holding its tokenizer files and config.json), loaded by transformers' AutoTokenizer, gives
    the ids its tokenizer.json gives for each probe text (no special tokens added). Where the tokenizer_class its
    tokenizer_config.json names does not (or does not load, or fails on a text: a class rebuilt from a vocabulary it
    was not made for), that file (the export's copy) is made to name PreTrainedTokenizerFast instead, in a note:
    transformers then loads tokenizer.json whole, the pipeline the store was tokenized with, and the folder is probed
    again. Still failing: a UserError naming NAMED (the source's tokenizer_config.json, or its tokenizer.json), the
    class and how it fails (the first differing probe). Without transformers, a note in LOG that the check was not
    run. transformers' own log lines on these loads are kept out of the export's output."""
    try:
        import transformers
    except ImportError:
        log("note: transformers is not installed: the tokenizer shipped was not checked to tokenize as its "
            "tokenizer.json does (install transformers to check it)")
        return
    from nanotronix.data.tokenizer import read_tokenizer_file

    reference = read_tokenizer_file(folder / "tokenizer.json")  # as the store was tokenized
    texts = probe_texts([token.content for _, token in sorted(reference.get_added_tokens_decoder().items())])
    config_file = folder / "tokenizer_config.json"
    # UTF-8 whatever the locale: what hf_tokenizer_files checked it is, and what transformers reads
    config = json.loads(config_file.read_text(encoding="utf-8"))
    named_class = config.get("tokenizer_class")
    parts = _text_parts(reference)
    with _without_transformers_log():
        failure = _failure(transformers, folder, reference, parts, texts)
    if failure is None:
        return
    if named_class == WHOLE:
        raise UserError(f"{named}: tokenizer_class {json.dumps(named_class)}, {failure}")
    config["tokenizer_class"] = WHOLE
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with _without_transformers_log():
        still = _failure(transformers, folder, reference, parts, texts)
    if still is not None:
        raise UserError(f"{named}: tokenizer_class {json.dumps(named_class)}, {failure}, and {WHOLE} in its place, "
                        f"with the folder's other settings, {still}")
    log(f"note: {named}: tokenizer_class {json.dumps(named_class)}, {failure}: the export's tokenizer_config.json "
        f"names {WHOLE} instead, which loads tokenizer.json whole")


def _failure(transformers, folder: Path, reference, parts: dict, texts: list[str]) -> Optional[str]:
    """None where AutoTokenizer loads FOLDER and gives REFERENCE's ids for each of TEXTS, its tokenizers backend holding
    REFERENCE's PARTS (_text_parts); else how it fails, in a clause on the class ("which transformers 5.25.0 builds as
    GPT2Tokenizer, tokenizes text otherwise ...")."""
    version = transformers.__version__
    try:
        auto = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 (whatever it raises, the folder does not load)
        return f"which transformers {version} cannot load from the folder the export would ship ({_reason(e)})"
    built = f"which transformers {version} builds as {type(auto).__name__}"
    for text in texts:
        try:  # verbose=False: no warning for a probe longer than a small model_max_length
            ids = auto(text, add_special_tokens=False, verbose=False)["input_ids"]
        except Exception as e:  # noqa: BLE001 (a class rebuilt from another model's vocabulary: a missing [UNK])
            return f"{built}, fails to tokenize text (first {_shown(text)}: {_reason(e)})"
        if ids != reference.encode(text, add_special_tokens=False).ids:
            return f"{built}, tokenizes text otherwise than its tokenizer.json (first {_shown(text)})"
    backend = getattr(auto, "backend_tokenizer", None)  # a class of transformers' own Python pipeline has none
    theirs = _text_parts(backend) if backend is not None else parts
    for part in _TEXT_PARTS:
        if theirs[part] != parts[part]:
            return (f"{built}, with another {part} than its tokenizer.json's ({_kind(theirs[part])}, not "
                    f"{_kind(parts[part])})")
    return None


@contextlib.contextmanager
def _without_transformers_log():
    """transformers' own log lines (on the class a folder names, "`tokenizer_class` is `LlamaTokenizer` but
    `tokenizer.json` is ByteLevel"; on a setting it ignores) are about loads the user did not ask for: kept out of the
    export's output, where the note says what matters. Its loggers all answer to the library's root logger."""
    library = logging.getLogger("transformers")
    level = library.level
    library.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        library.setLevel(level)


def _text_parts(tokenizer) -> dict:
    """TOKENIZER's (a tokenizers.Tokenizer) _TEXT_PARTS, as its tokenizer.json would hold them (each serialized alone:
    the whole tokenizer's JSON, its vocabulary and merges, takes a third of a second for SmolLM2's)."""
    return {part: None if getattr(tokenizer, part) is None else json.loads(getattr(tokenizer, part).__getstate__())
            for part in _TEXT_PARTS}


def _kind(part: Optional[dict]) -> str:
    return part.get("type", "?") if isinstance(part, dict) else "none"


def _reason(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _shown(text: str) -> str:
    return json.dumps(text[:_SHOWN_CHARS] + ("..." if len(text) > _SHOWN_CHARS else ""), ensure_ascii=False)
