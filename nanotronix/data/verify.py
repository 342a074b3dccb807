"""Whole-store invariant checks behind `inspect_store.py --verify`. They stream the index and the tokens in
bounded chunks (a store can be far larger than memory) and raise DataError naming the first damage."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .store import TokenStore, require_integer_tokens

_CHUNK = 1 << 22
_DOC_CHUNK = 1 << 16


def check_index_arrays(store, progress: bool = False) -> None:
    """Megatron: lengths >= 0, pointers contiguous from 0, document indices 0..N non-decreasing."""
    n, itemsize = store.num_sequences, store.dtype.itemsize
    where = store.idx_path
    offset = 0
    for lo in tqdm(range(0, n, _CHUNK), desc="index", unit="chunk", disable=not progress):
        lengths = np.asarray(store.sequence_lengths[lo:lo + _CHUNK], dtype=np.int64)
        if lengths.size and lengths.min() < 0:
            bad = lo + int(np.argmin(lengths))
            raise DataError(f"{where}: sequence {bad} has negative length {int(lengths.min())}")
        sizes = lengths * itemsize
        expected = np.cumsum(sizes) - sizes + offset
        pointers = np.asarray(store.sequence_pointers[lo:lo + _CHUNK])
        if not np.array_equal(pointers, expected):
            bad = lo + int(np.flatnonzero(pointers != expected)[0])
            raise DataError(f"{where}: sequence {bad} points to byte {int(store.sequence_pointers[bad])}, "
                            f"expected {int(expected[bad - lo])} (sequences must be contiguous)")
        offset += int(sizes.sum())
    doc = store.document_indices
    if int(doc[0]) != 0 or int(doc[-1]) != n:
        raise DataError(f"{where}: document indices run {int(doc[0])}..{int(doc[-1])}, expected 0..{n}")
    for lo in range(0, len(doc), _CHUNK):
        part = np.asarray(doc[lo:lo + _CHUNK + 1])
        if part.size > 1 and np.any(np.diff(part) < 0):
            raise DataError(f"{where}: document indices decrease after entry {lo + int(np.argmin(np.diff(part)))}")
    check_tokens_and_sidecar(store, progress)


def check_tokens_and_sidecar(store: TokenStore, progress: bool = False) -> None:
    """Token ids within the vocabulary, every document ends with EOS, sidecar counts match the store."""
    require_integer_tokens(store, store.path)
    meta = store.metadata
    if meta:
        for key, actual in (("num_documents", store.num_documents), ("num_tokens", store.num_tokens)):
            if key in meta and meta[key] != actual:
                raise DataError(f"{store.path}: sidecar says {key}={meta[key]!r}, the store holds {actual}")
    vocab = store.vocab_size
    total = store.num_tokens
    for lo in tqdm(range(0, total, _CHUNK), desc="tokens", unit="chunk", disable=not progress):
        part = store.tokens(lo, min(_CHUNK, total - lo))
        if part.size and (int(part.min()) < 0 or (vocab is not None and int(part.max()) >= vocab)):
            bad = lo + int(np.flatnonzero((part < 0) | (part >= (np.inf if vocab is None else vocab)))[0])
            raise DataError(f"{store.path}: token {bad} has id {int(store.tokens(bad, 1)[0])}, outside the "
                            f"vocabulary of {vocab}")
    eos = store.eos_id
    if eos is not None and meta.get("eos_appended", False):
        end = 0
        for lo in range(0, store.num_documents, _DOC_CHUNK):
            lengths = store.document_lengths(lo, lo + _DOC_CHUNK)
            if lengths.size and lengths.min() <= 0:
                raise DataError(f"{store.path}: document {lo + int(np.argmin(lengths))} is empty (no EOS)")
            ends = end + np.cumsum(lengths)
            last = store.gather(ends - 1)
            if np.any(last != eos):
                bad = lo + int(np.flatnonzero(last != eos)[0])
                raise DataError(f"{store.path}: document {bad} does not end with the EOS id {eos}")
            end = int(ends[-1]) if len(ends) else end
