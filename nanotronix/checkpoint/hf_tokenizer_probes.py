"""The tokenizer folder a Hugging Face export ships tokenizes text as its tokenizer.json does (what the token stores
were tokenized with), and decodes ids back into the text tokenizer.json decodes them into (where it has a decoder),
checked by loading it with transformers' AutoTokenizer on a fixed set of probe texts, and by comparing the normalizer,
pre-tokenizer and decoder of the tokenizers pipeline it builds with tokenizer.json's.

Why a load, not a reading of the files as hf_tokenizer_files does: transformers 5 (5.25 here) builds the class
tokenizer_config.json names. PreTrainedTokenizerFast and TokenizersBackend (the class of a tokenizer_class it does not
know) load tokenizer.json whole. A class with a pipeline of its own (GPT2Tokenizer, SmolLM2's; Qwen2Tokenizer, ...:
each subclass of TokenizersBackend with an __init__ of its own; LlamaTokenizer too, but beside a byte-level
tokenizer.json, which it loads as TokenizersBackend) is rebuilt from tokenizer.json's vocabulary and merges alone,
with its own normalizer, pre-tokenizer and decoder (it keeps tokenizer.json's post-processor, padding and truncation):
text tokenizes otherwise wherever tokenizer.json's normalizer or pre-tokenizer differ from the class's — a Lowercase
normalizer, or SmolLM2's digit splitting before its byte-level pre-tokenizer ("x  =  1": GPT2Tokenizer's regex keeps
the space before the digit, then finds no "Ġ1" in a vocabulary trained on split digits) — and ids decode otherwise
wherever the decoders differ. Which class AutoTokenizer picks also depends on config.json and on transformers' own
tables, so the folder is loaded as a user loads it, once per export, rather than the rules written out here. Where the
class named tokenizes or decodes otherwise, the export's copy of tokenizer_config.json names PreTrainedTokenizerFast
instead (in a note), which tokenizes as the store: SmolLM2's Hub folder is shipped so.

Two settings of tokenizer_config.json change what every class does (transformers 5.25 reads no other into its
encoding or decoding; add_prefix_space, spaces_between_special_tokens and the like only steer a class's rebuilt
pipeline, which the probes cover): clean_up_tokenization_spaces true makes decode() remove the spaces before
punctuation ("x != y" comes back "x!= y"; 5.25 ignores it, with a warning, for a BPE model, unless
clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output is true too). transformers 4 saved it true
into many folders by default, and it rewrites the text the model generates, so the export's copy sets it false (in a
note). split_special_tokens true makes a special token written in text tokenize as the text of its characters, where
the store holds the token: a choice a user makes for the model's users (text they type cannot hold a control token),
not a leftover, so the export is refused naming it rather than the setting dropped. transformers is optional for the
export: without it the check is not run, and the export says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
_CONTEXT_CHARS = 8  # before the first character where a probe decodes otherwise, shown with it
# The parts of a tokenizers pipeline that change text before the model sees it, and the ids it gives back into text. A
# class rebuilt with others than tokenizer.json's tokenizes or decodes otherwise on some text even where every probe
# agrees (a Replace normalizer of a pattern no probe holds), so they are compared too; transformers 5.25 keeps them when
# it loads tokenizer.json whole.
_TEXT_PARTS = ("normalizer", "pre_tokenizer", "decoder")
# Fields that tokenizers serializes with a part but does not read in that part's work, left out of the comparison: a
# ByteLevel decoder maps each character back to its byte whatever its flags hold (tokenizers written by other tools
# hold them false, transformers' rebuilt ones true), and a ByteLevel pre-tokenizer's trim_offsets is read only by the
# ByteLevel post-processor (tokenizer.json's, which transformers keeps).
_UNREAD_FIELDS = {("decoder", "ByteLevel"): ("add_prefix_space", "trim_offsets", "use_regex"),
                  ("pre_tokenizer", "ByteLevel"): ("trim_offsets",)}


def probe_texts(added_tokens: list[str]) -> list[str]:
    """PROBES, then each added token inside text: first, between words, beside spaces, digits and punctuation."""
    return [*PROBES, *(f"{token}a{token}b {token} 1{token}\n{token}.({token})," for token in added_tokens)]


WHOLE = "PreTrainedTokenizerFast"  # the tokenizer_class transformers builds by loading tokenizer.json whole
CLEAN_UP = "clean_up_tokenization_spaces"
SPLIT_SPECIAL = "split_special_tokens"
_SPLIT_SPECIAL_WHY = ("a special token written in text is split into other tokens, where the store holds the token "
                      "(set it false, or remove it, to ship this tokenizer)")


@dataclasses.dataclass(frozen=True)
class _Failure:
    """How the folder fails, a clause on it ("which transformers 5.25.0 builds as GPT2Tokenizer, tokenizes text
    otherwise than its tokenizer.json (first ...)"), and the setting of tokenizer_config.json that makes it fail
    (CLEAN_UP, SPLIT_SPECIAL), None where it is the class."""
    clause: str
    setting: Optional[str] = None


def check_tokenizes_as_tokenizer_json(folder: Path, named: Path, log: Callable[[str], None]) -> None:
    """FOLDER (an export's, holding its tokenizer files and config.json), loaded by transformers' AutoTokenizer, gives
    the ids its tokenizer.json gives for each probe text (no special tokens added) and decodes those ids into the
    text tokenizer.json decodes them into (special tokens kept; where it has a decoder). Where it does not, the
    export's copy of tokenizer_config.json is changed, each change in a note naming NAMED (the source's
    tokenizer_config.json, or its tokenizer.json), and the folder probed again: clean_up_tokenization_spaces true,
    where it is the cause, is set false; a tokenizer_class that does (or does not load, or fails on a text: a class
    rebuilt from a vocabulary it was not made for) is replaced by PreTrainedTokenizerFast, which loads tokenizer.json
    whole, the pipeline the store was tokenized with. Still failing, or failing by split_special_tokens: a UserError
    naming NAMED, the setting or the class and how it fails (the first differing probe). transformers' own log lines
    on these loads are kept out of the export's output. Without transformers, a note in LOG that the check was not
    run."""
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
    parts = _text_parts(reference)
    changes: list[tuple[str, str, str]] = []  # (why, what the export's copy holds instead: a clause, a note's end)
    with _without_transformers_log():
        failure = _failure(transformers, folder, reference, parts, texts)
        changed: set[str] = set()
        while failure is not None:
            change = _change(failure, config)
            if change is None or change[0] in changed:  # each key changed once at most: the loop ends
                raise UserError(_refusal(named, config, failure, changes))
            key, value, *said = change
            changed.add(key)
            changes.append(tuple(said))
            config[key] = value
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            failure = _failure(transformers, folder, reference, parts, texts)
    for why, _, done in changes:
        log(f"note: {named}: {why}: the export's tokenizer_config.json {done}")


def _change(failure: _Failure, config: dict) -> Optional[tuple]:
    """The change to the export's copy of tokenizer_config.json (CONFIG) that makes FAILURE go, (key, value, why,
    what it holds instead, what the note says it does), once per key; None where no change does."""
    setting = _setting(failure, config)
    if setting == CLEAN_UP:
        return (CLEAN_UP, False, f"{CLEAN_UP} {json.dumps(config[CLEAN_UP])}: the folder, {failure.clause}",
                f"{CLEAN_UP} false in its place", "sets it false")
    named_class = config.get("tokenizer_class")
    if setting is None and named_class != WHOLE:
        return ("tokenizer_class", WHOLE, f"tokenizer_class {json.dumps(named_class)}, {failure.clause}",
                f"{WHOLE} in its place", f"names {WHOLE} instead, which loads tokenizer.json whole")
    return None


def _refusal(named: Path, config: dict, failure: _Failure, changes: list[tuple[str, str, str]]) -> str:
    """The line refusing the folder: the setting that FAILURE names (split_special_tokens), else the changes made
    (CHANGES) and how it still fails, else the class it names and how it fails."""
    if _setting(failure, config) == SPLIT_SPECIAL:
        return f"{named}: {SPLIT_SPECIAL} {json.dumps(config[SPLIT_SPECIAL])}: the folder, {failure.clause}: " \
               f"{_SPLIT_SPECIAL_WHY}"
    if changes:
        whys, instead = ", and ".join(why for why, _, _ in changes), ", ".join(held for _, held, _ in changes)
        return f"{named}: {whys}, and {instead}, with the folder's other settings, {failure.clause}"
    return f"{named}: tokenizer_class {json.dumps(config.get('tokenizer_class'))}, {failure.clause}"


def _setting(failure: _Failure, config: dict) -> Optional[str]:
    """The setting that makes FAILURE where CONFIG (tokenizer_config.json) holds it; None where the class does (its
    own default for it, or its pipeline)."""
    return failure.setting if failure.setting is not None and config.get(failure.setting) else None


def _failure(transformers, folder: Path, reference, parts: dict, texts: list[str]) -> Optional[_Failure]:
    """None where AutoTokenizer loads FOLDER, gives REFERENCE's ids for each of TEXTS, decodes them into REFERENCE's
    text, and its tokenizers backend holds REFERENCE's PARTS (_text_parts), the decoding and the decoder compared only
    where REFERENCE has a decoder; else how it fails."""
    version = transformers.__version__
    try:
        auto = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 (whatever it raises, the folder does not load)
        return _Failure(f"which transformers {version} cannot load from the folder the export would ship "
                        f"({_reason(e)})")
    built = f"which transformers {version} builds as {type(auto).__name__}"
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False).ids
        try:  # verbose=False: no warning for a probe longer than a small model_max_length
            ids = auto(text, add_special_tokens=False, verbose=False)["input_ids"]
        except Exception as e:  # noqa: BLE001 (a class rebuilt from another model's vocabulary: a missing [UNK])
            return _Failure(f"{built}, fails to tokenize text (first {_shown(text)}: {_reason(e)})")
        if ids != expected:
            # the setting, where the same call without it gives the store's ids
            split = getattr(auto, SPLIT_SPECIAL, False) and auto(
                text, add_special_tokens=False, verbose=False, split_special_tokens=False)["input_ids"] == expected
            return _Failure(f"{built}, tokenizes text otherwise than its tokenizer.json (first {_shown(text)})",
                            SPLIT_SPECIAL if split else None)
    # A tokenizer.json with no decoder decodes ids into its tokens' own strings joined by spaces ("ĠThe Ġquick"), no
    # text of its own to keep: where a class gives the text back with a decoder of its own, that is no worse.
    decodes = parts["decoder"] is not None
    shared = _shared_ids(reference) if decodes else set()
    for text in texts if decodes else ():
        ids = reference.encode(text, add_special_tokens=False).ids
        failure = _decode_failure(auto, built, reference, ids, text) if shared.isdisjoint(ids) else None
        if failure is not None:
            return failure
    backend = getattr(auto, "backend_tokenizer", None)  # a class of transformers' own Python pipeline has none
    theirs = _text_parts(backend) if backend is not None else parts
    for part in _TEXT_PARTS if decodes else [part for part in _TEXT_PARTS if part != "decoder"]:
        if theirs[part] != parts[part]:
            return _Failure(f"{built}, with another {part} than its tokenizer.json's ({_kind(theirs[part])}, not "
                            f"{_kind(parts[part])})")
    return None


def _decode_failure(auto, built: str, reference, ids: list[int], text: str) -> Optional[_Failure]:
    """None where AUTO decodes IDS (TEXT's) as REFERENCE does, special tokens kept (what a user of the model does with
    the ids it generates); else how it fails, the setting CLEAN_UP where AUTO's tokenizers backend decodes them as
    REFERENCE does and transformers, cleaning up spaces, changes that text (the one step its decode() adds)."""
    expected = reference.decode(ids, skip_special_tokens=False)
    try:
        decoded = auto.decode(ids, skip_special_tokens=False)
    except Exception as e:  # noqa: BLE001 (a class rebuilt with a decoder of another vocabulary)
        return _Failure(f"{built}, fails to decode ids (first those of {_shown(text)}: {_reason(e)})")
    if decoded == expected:
        return None
    backend = getattr(auto, "backend_tokenizer", None)
    cleaned = getattr(auto, CLEAN_UP, False) and backend is not None and \
        backend.decode(ids, skip_special_tokens=False) == expected
    return _Failure(f"{built}, decodes ids otherwise than its tokenizer.json (first those of {_shown(text)}: "
                    f"{_difference(decoded, expected)})", CLEAN_UP if cleaned else None)


def _shared_ids(tokenizer) -> set[int]:
    """The ids that two tokens of TOKENIZER's vocabulary share (a hand edit): tokenizers decodes such an id as either
    token, which one differing from load to load (of its reverse map, built from a hash map), so the decoding of a
    probe holding one is not compared: it would ship or refuse the folder by chance."""
    first: dict[int, str] = {}
    return {index for token, index in tokenizer.get_vocab(with_added_tokens=True).items()
            if first.setdefault(index, token) != token}


_SAID_ONCE = {"warning_once": logging.Logger.warning, "info_once": logging.Logger.info}  # transformers' own


@contextlib.contextmanager
def _without_transformers_log():
    """transformers' own log lines (on the class a folder names, "`tokenizer_class` is `LlamaTokenizer` but
    `tokenizer.json` is ByteLevel"; on a setting it ignores) are about loads the user did not ask for: kept out of the
    export's output, where the note says what matters. Its loggers all answer to the library's root logger. A line
    transformers says once per process (its warning_once and info_once, which it adds to logging.Logger) is remembered
    as said even when not shown: the plain methods stand in for them meanwhile, so that a user's own load of the folder
    after the export, in the same process, still says it."""
    library = logging.getLogger("transformers")
    level = library.level
    once = {name: vars(logging.Logger)[name] for name in _SAID_ONCE if name in vars(logging.Logger)}
    library.setLevel(logging.CRITICAL + 1)
    for name in once:
        setattr(logging.Logger, name, _SAID_ONCE[name])
    try:
        yield
    finally:
        library.setLevel(level)
        for name, method in once.items():
            setattr(logging.Logger, name, method)


def _text_parts(tokenizer) -> dict:
    """TOKENIZER's (a tokenizers.Tokenizer) _TEXT_PARTS, as its tokenizer.json would hold them (each serialized alone:
    the whole tokenizer's JSON, its vocabulary and merges, takes a third of a second for SmolLM2's), less the fields
    tokenizers does not read in them (_UNREAD_FIELDS)."""
    return {part: None if getattr(tokenizer, part) is None else
            _without_unread_fields(part, json.loads(getattr(tokenizer, part).__getstate__())) for part in _TEXT_PARTS}


def _without_unread_fields(part: str, value):
    """VALUE (PART's JSON, or a piece of it: a Sequence holds its parts in a list) without its _UNREAD_FIELDS."""
    if isinstance(value, list):
        return [_without_unread_fields(part, item) for item in value]
    if not isinstance(value, dict):
        return value
    unread = _UNREAD_FIELDS.get((part, value.get("type")), ())
    return {key: _without_unread_fields(part, item) for key, item in value.items() if key not in unread}


def _kind(part: Optional[dict]) -> str:
    return part.get("type", "?") if isinstance(part, dict) else "none"


def _reason(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _shown(text: str) -> str:
    return json.dumps(text[:_SHOWN_CHARS] + ("..." if len(text) > _SHOWN_CHARS else ""), ensure_ascii=False)


def _difference(decoded: str, expected: str) -> str:
    """Where DECODED first differs from EXPECTED, each shown from a few characters before it."""
    at = next((i for i, (a, b) in enumerate(zip(decoded, expected)) if a != b), min(len(decoded), len(expected)))
    start = max(0, at - _CONTEXT_CHARS)

    def shown(text: str) -> str:
        return json.dumps(("..." if start else "") + text[start:start + _SHOWN_CHARS // 2] +
                          ("..." if len(text) > start + _SHOWN_CHARS // 2 else ""), ensure_ascii=False)
    return f"{shown(decoded)}, not {shown(expected)}"
