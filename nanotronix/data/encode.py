"""Worker side of preprocessing: parse and validate one chunk of records, tokenize the good ones with
`encode_batch`, append EOS to each document and return them as one flat array plus lengths.

Bad-record reasons (the keys counted in the sidecar): invalid UTF-8, invalid JSON, not a JSON object,
missing text key, text not a string, empty text (nothing but whitespace).

A document longer than LONG_TEXT_CHARS is encoded in pieces: `tokenizers` keeps ~125 bytes per input byte while it
encodes one text (each token's string and offsets beside its id), so one 100 MB document would take a worker to
12 GB. A piece ends at a single space between two words, and only where encoding the 512 characters around the cut
whole gives the ids of its two halves, so the document's ids are those of encoding it whole (a tokenizer whose
pre-tokenizer sees the start of a text, such as Metaspace's prepended "▁", finds no such cut and is not split).
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError
from .inputs import Chunk, MissingColumn, expand_inputs, iter_chunks, whole_files

_TOKENIZER = None  # per-process tokenizer, set once by init_worker
_EOS = 0
_DTYPE = np.dtype(np.int32)
_THREADS: ThreadPoolExecutor | None = None  # a worker process's encoding threads (see pipeline.py)
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


def use_tokenizer(tokenizer, eos_id: int, dtype) -> None:
    """Set this process's encoder; worker processes forked afterwards inherit it (no reload)."""
    global _TOKENIZER, _EOS, _DTYPE
    _TOKENIZER, _EOS, _DTYPE = tokenizer, eos_id, np.dtype(dtype)


def init_threads(threads: int, parent_pid: int) -> None:
    """Initialiser of forked worker processes: the threads that encode a group of chunks side by side (created
    after the fork: threads do not survive one)."""
    global _THREADS
    _end_with_parent(parent_pid)
    _THREADS = ThreadPoolExecutor(threads, thread_name_prefix="encode") if threads > 1 else None


def init_worker(tokenizer_file: str, eos_id: int, dtype: str, threads: int, parent_pid: int) -> None:
    """Initialiser of spawned workers (where fork is unavailable): load the tokenizer once per process."""
    from .tokenizer import read_tokenizer_file
    init_threads(threads, parent_pid)
    use_tokenizer(read_tokenizer_file(tokenizer_file), eos_id, dtype)


def _end_with_parent(parent_pid: int) -> None:
    """A worker ends with the preprocess that started it: the kernel kills it when its parent dies (SIGKILL, the
    OOM killer; a worker would otherwise encode on, orphaned, holding a core and its memory), and it ignores the
    SIGINT/SIGTERM sent to the whole process group (Ctrl-C, scancel), which the parent handles by removing its
    partial output and stopping its workers; a worker dying of them first would be reported as a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


@dataclass
class EncodedChunk:
    tokens: np.ndarray  # all documents, each followed by EOS
    lengths: np.ndarray  # tokens per document (EOS included)
    files: np.ndarray  # input piece index of each document
    # (input piece, line | "byte B", reason, detail), in order
    bad: list[tuple[int, int | str, str, str]] = field(default_factory=list)


def _text_of(chunk: Chunk, item, text_key: str):
    """(text, None) for a good record, (None, (reason, detail)) for a bad one."""
    if chunk.kind == "text":  # one item: a whole file
        try:
            text = item.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors put first, as below
        except UnicodeDecodeError as e:
            return None, ("invalid UTF-8", f"byte {e.start}")
    elif chunk.kind == "jsonl":
        try:
            line = item.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, ("invalid UTF-8", f"byte {e.start}")
        try:
            record = json.loads(line.removeprefix("\ufeff"))  # a byte-order mark some editors put before line 1
        except ValueError as e:
            return None, ("invalid JSON", f"{e}; JSON lines are read: one object per line")
        except RecursionError:  # what the JSON reader raises for a value nested past the interpreter's recursion limit
            return None, ("invalid JSON", "nested deeper than the JSON reader recurses")
        if not isinstance(record, dict):
            return None, ("not a JSON object", f"{type(record).__name__}; JSON lines are read: one object per line")
        if text_key not in record:  # the keys it has, for --text-key (a corpus whose field is "content")
            keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            return None, ("missing text key", f"{text_key!r}; its keys: {keys}; --text-key names another")
        text = record[text_key]
    else:
        if isinstance(item, MissingColumn):
            columns = ", ".join(repr(c) for c in item.columns[:8]) or "none"
            return None, ("missing text key", f"{text_key!r}; its columns: {columns}; --text-key names another")
        text = item
    if not isinstance(text, str):
        return None, ("text not a string", type(text).__name__)
    if not text.strip():
        return None, ("empty text", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        return None, ("invalid UTF-8", "lone surrogate")
    return text, None


def read_texts(specs: list[str], text_key: str):
    """The text of every record of the inputs (files or folders, in every format preprocess reads), in order; a bad
    record is a DataError at its file:line, as in preprocess, except that empty ones (an empty __init__.py) are
    passed over: they hold nothing to learn (tools/train_tokenizer.py reads its text this way)."""
    pieces = whole_files(expand_inputs(specs))
    found = False
    for chunk in iter_chunks(pieces, text_key):
        for k, item in enumerate(chunk.items):
            text, problem = _text_of(chunk, item, text_key)
            if problem is not None and problem[0] == "empty text":
                continue
            if problem is not None:
                piece, line = chunk.position(k)
                reason, detail = problem
                raise DataError(f"{pieces[piece].path}:{line}: {reason}{f' ({detail})' if detail else ''}")
            found = True
            yield text
    if not found:
        raise DataError(f"no text in {', '.join(specs)}")


def encode_chunks(chunks: list[Chunk], text_key: str, stop_at_first_bad: bool) -> list[EncodedChunk]:
    """Several chunks, on this process's encoding threads when it has them; results in order."""
    if _THREADS is None or len(chunks) == 1:
        return [encode_chunk(chunk, text_key, stop_at_first_bad) for chunk in chunks]
    return list(_THREADS.map(encode_chunk, chunks, [text_key] * len(chunks), [stop_at_first_bad] * len(chunks)))


def encode_chunk(chunk: Chunk, text_key: str, stop_at_first_bad: bool) -> EncodedChunk:
    texts: list[str] = []
    files: list[int] = []
    bad: list[tuple[int, int | str, str, str]] = []
    for k, item in enumerate(chunk.items):
        text, problem = _text_of(chunk, item, text_key)
        file_index, line = chunk.position(k)
        if problem is None:
            texts.append(text)
            files.append(file_index)
        else:
            bad.append((file_index, line, problem[0], problem[1]))
            if stop_at_first_bad:
                return EncodedChunk(np.zeros(0, _DTYPE), np.zeros(0, np.int64), np.zeros(0, np.int32), bad)
    ids: list = [None] * len(texts)
    short = [i for i, text in enumerate(texts) if len(text) <= LONG_TEXT_CHARS]
    if short:
        encodings = _encode_batch([texts[i] for i in short])
        for i, enc in zip(short, encodings):
            ids[i] = enc.ids
    for i, text in enumerate(texts):
        if ids[i] is None:
            ids[i] = _encode_long(text)
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=_DTYPE)
    pos = 0
    for doc, n in zip(ids, lengths.tolist()):
        tokens[pos:pos + n - 1] = doc
        tokens[pos + n - 1] = _EOS
        pos += n
    return EncodedChunk(tokens, lengths, np.array(files, dtype=np.int32), bad)


LONG_TEXT_CHARS = 1 << 20  # a document longer than this is encoded in pieces of about this many characters
_CUT_WINDOW = 256  # characters each side of a cut that are encoded to check it
_CUT_TRIES = 64  # candidate cuts checked before a piece is given up on (the rest is then encoded whole)


def _encode_batch(texts: list[str]):
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets that preprocessing never uses
    encode_batch = getattr(_TOKENIZER, "encode_batch_fast", _TOKENIZER.encode_batch)
    return encode_batch(texts, add_special_tokens=False)


def _encode_long(text: str) -> np.ndarray:
    """The ids of a long text, encoded a piece at a time (see the module docstring)."""
    parts, start = [], 0
    while start < len(text):
        end = _cut(text, start + LONG_TEXT_CHARS) if len(text) - start > LONG_TEXT_CHARS else len(text)
        parts.append(np.asarray(_encode_batch([text[start:end]])[0].ids, dtype=_DTYPE))
        start = end
    return np.concatenate(parts)


def _cut(text: str, target: int) -> int:
    """A position at or before `target` where the text can be encoded in two parts with the ids of encoding it
    whole, or len(text) when none is found within _CUT_TRIES candidates."""
    lowest, hi = target - LONG_TEXT_CHARS // 2, target
    for _ in range(_CUT_TRIES):
        at = text.rfind(" ", lowest, hi)
        if at <= 0:
            break
        hi = at
        if text[at - 1].isspace() or at + 1 >= len(text) or text[at + 1].isspace():
            continue
        lo = max(0, at - _CUT_WINDOW)
        window = text[lo:at + _CUT_WINDOW]
        whole, left, right = _encode_batch([window, window[:at - lo], window[at - lo:]])
        if whole.ids == left.ids + right.ids:
            return at
    return len(text)
