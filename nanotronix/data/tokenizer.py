"""Load a Hugging Face `tokenizers.Tokenizer` from a file, a folder or a Hub id, with the facts a token store
records about it (name, sha256 of the file, vocabulary size, end-of-document id).

The spec is resolved in this order: an existing `tokenizer.json` file; an existing folder holding one; a
string that looks like a path (starts with `/`, `.`, `~` or ends in `.json`) is reported as missing; anything
else is treated as a Hugging Face Hub repository id and fetched with `huggingface_hub` (which uses its cache,
so a tokenizer fetched once also works offline).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer

from .errors import DataError

# Tokens that end a document in the common tokenizer families, tried in this order when no
# tokenizer_config.json names the EOS token. SmolLM2's id 0 is `<|endoftext|>`.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


# Token ids a store can hold: Megatron's .bin holds int32 above 65500 tokens (megatron_store.optimal_dtype)
STORE_IDS = 2 ** 31


@dataclass(frozen=True)
class TokenizerInfo:
    name: str  # the spec as the user gave it (path or Hub id)
    file: str  # resolved tokenizer.json path
    sha256: str  # of the tokenizer.json bytes
    vocab_size: int  # its largest id + 1 (the embedding rows its ids need), added/special tokens included
    eos_id: int
    eos_token: str

    def to_dict(self) -> dict:
        return asdict(self)


def file_sha256(file: Path) -> str:
    """What a store's sidecar records of the tokenizer file that wrote it."""
    return hashlib.sha256(file.read_bytes()).hexdigest()


def names_a_path(spec: str) -> bool:
    """SPEC names a path on this machine, not a Hub id: one that exists, or one written as a path (starting with `/`,
    `.` or `~`, or ending in `.json`), which load_tokenizer reports as missing rather than fetches."""
    return Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")) or spec.endswith(".json")


def local_tokenizer_sha256(spec: Optional[str]) -> Optional[str]:
    """`file_sha256` of a local tokenizer spec (a tokenizer.json, or a folder holding one); None for a Hub id or a
    path that is not on this machine (nothing is downloaded)."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    path = path / "tokenizer.json" if path.is_dir() else path
    try:
        return file_sha256(path) if path.is_file() else None
    except OSError:
        return None


def load_tokenizer(spec: str) -> tuple[Tokenizer, TokenizerInfo]:
    """Return (tokenizer, info) for a tokenizer.json path, a folder holding one, or a Hub id."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        file = path
    elif path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            raise DataError(f"tokenizer folder {spec} has no tokenizer.json")
    elif names_a_path(spec) or not spec:
        raise DataError(f"tokenizer not found: {spec}")
    else:
        file = _download_from_hub(spec)
    try:
        tokenizer = read_tokenizer_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"tokenizer {file}: cannot be loaded ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None
    eos_token = _find_eos_token(tokenizer, file)
    vocab_size = ids_needed(tokenizer)
    if vocab_size > STORE_IDS:
        raise DataError(f"tokenizer {file}: gives token ids up to {vocab_size - 1}, past the largest a token store "
                        f"holds ({STORE_IDS - 1})")
    info = TokenizerInfo(
        name=spec,
        file=str(file),
        sha256=file_sha256(file),
        vocab_size=vocab_size,
        eos_id=tokenizer.token_to_id(eos_token),
        eos_token=eos_token,
    )
    return tokenizer, info


def read_tokenizer_file(file: str | Path) -> Tokenizer:
    """FILE's tokenizer without the truncation and padding a tokenizer.json may hold (transformers saves those of its
    last call with truncation=True or padding, and tokenizers applies them to every encode): a store holds each
    document's ids whole, as AutoTokenizer gives them unless a call asks it to truncate or pad."""
    tokenizer = Tokenizer.from_file(str(file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def ids_needed(tokenizer: Tokenizer) -> int:
    """Its largest token id + 1: the size of a vocabulary (an embedding, a store's dtype) that holds every id it
    gives. A tokenizer.json whose vocab has an id past its token count (a hand edit: 70000 in a 400-token vocab) is
    counted by that id, not by its entries: get_vocab_size would say 400, and a uint16 store or a 400-row embedding
    could not hold the 70000 it gives."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    return max(tokenizer.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def _download_from_hub(repo_id: str) -> Path:
    with _hub_warnings_unsaid():
        try:
            from huggingface_hub import hf_hub_download
            file = hf_hub_download(repo_id=repo_id, filename="tokenizer.json")
        except Exception as e:  # offline, unknown repo, no tokenizer.json: all one clear line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"tokenizer {repo_id!r} is not a local path and could not be fetched from the "
                            f"Hugging Face Hub ({type(e).__name__}: {reason})") from None
        try:  # the config names the EOS token when it is not one of the usual ones; optional
            hf_hub_download(repo_id=repo_id, filename="tokenizer_config.json")
        except Exception:
            pass
    return Path(file)


@contextlib.contextmanager
def _hub_warnings_unsaid():
    """huggingface_hub's warnings held back: offline, each retry said "'[Errno -2] Name or service not known' thrown
    while requesting HEAD ..." on a line of its own before the one error line that says the same."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _find_eos_token(tokenizer: Tokenizer, file: Path) -> str:
    if tokenizer.token_to_id("<|endoftext|>") is not None:
        return "<|endoftext|>"
    config_file = file.parent / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (ValueError, OSError, RecursionError):  # not JSON, not UTF-8, nested past the reader: none named
            config = None
        eos = config.get("eos_token") if isinstance(config, dict) else None
        if isinstance(eos, dict):  # older configs store an AddedToken dict
            eos = eos.get("content")
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            return eos
    for candidate in _EOS_CANDIDATES:
        if tokenizer.token_to_id(candidate) is not None:
            return candidate
    raise DataError(f"tokenizer {file}: has no end-of-document token (looked for <|endoftext|>, the eos_token of "
                    "tokenizer_config.json, and " + ", ".join(_EOS_CANDIDATES[1:]) + ")")
