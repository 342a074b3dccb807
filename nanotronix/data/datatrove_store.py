"""Reader for datatrove / nanotron tokenized files, the format of SmolLM2's own corpus tooling.

Format facts (datatrove `pipeline/tokens/tokenizer.py`, `utils/dataset.py`; no header anywhere):
- `NAME.ds`: the documents' tokens concatenated, little-endian, 2 bytes per token (uint16) or 4 (uint32);
- `NAME.ds.index`: little-endian uint64 end offset (in tokens, exclusive) of each document;
- `NAME.ds.metadata` (optional): text lines `TOKENIZER[|TOKEN_SIZE]`, token count, human-readable count.
A dataset is one `.ds` file or a folder of them (nanotron's Nanoset reads `FOLDER/*.ds` in sorted order);
the stream of a folder is its files' streams concatenated in that order. The token size comes from the
metadata's `|N` suffix or, for older files without it, from the file size divided by the index's last end; a file
that holds no tokens and no metadata takes its folder's (datatrove's reader takes one for a folder), else 2.

Hand-written because datatrove's own reader is a torch Dataset of fixed windows, not random access by token.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .store import TokenStore, absent, random_access_map

_CHUNK = 1 << 22


def datatrove_path(spec: str) -> Optional[Path]:
    """The .ds file or folder of .ds files that `spec` names, or None."""
    path = Path(spec)
    if path.suffix == ".ds" and path.is_file():
        return path
    if Path(f"{spec}.ds").is_file():
        return Path(f"{spec}.ds")
    if path.is_dir() and any(path.glob("*.ds")):
        return path
    return None


def _read_metadata(path: Path) -> tuple[Optional[str], Optional[int]]:
    if path.is_dir():  # optional, but a folder of its name is a copy gone wrong
        raise DataError(f"{path}: {absent(path)} (the .ds file's metadata)")
    if not path.is_file():
        return None, None
    first = path.read_text(errors="replace").splitlines()[:1]
    if not first:
        return None, None
    name, _, size = first[0].rpartition("|")
    if name and size.isascii() and size.isdigit():  # str.isdigit alone takes "²", which int() does not
        return name, int(size)
    return first[0], None


def open_datatrove(path: Path) -> TokenStore:
    """One .ds file, or a folder of them as one store (their streams in sorted file order)."""
    if path.is_dir():
        from .sharded_store import ConcatenatedStore
        parts = [DatatroveStore(p) for p in sorted(path.glob("*.ds"))]
        # A file with no tokens and no .metadata (a task that got no documents) tells no token size: it takes the
        # folder's, as datatrove's reader does (one token_size for the folder; such a file yields nothing), rather
        # than the 2 bytes that would refuse a folder of 4-byte files as mixing token dtypes.
        told = {p.dtype.itemsize for p in parts if p.tells_token_size}
        if len(told) == 1:
            size = told.pop()
            parts = [p if p.tells_token_size else DatatroveStore(Path(p.path), size) for p in parts]
        return ConcatenatedStore(str(path), parts)
    return DatatroveStore(path)


class DatatroveStore(TokenStore):
    """One `.ds` file with its `.ds.index` (and optional `.ds.metadata`). `untold_token_size`: the token size of a
    file whose metadata and sizes tell none (no tokens, no .metadata): datatrove's reader's default, 2, or its
    folder's (`open_datatrove`)."""
    format = "datatrove"

    def __init__(self, path: Path, untold_token_size: int = 2):
        super().__init__(str(path))
        if not path.is_file():  # a folder of a .ds file's name in a folder of them (a copy gone wrong)
            raise DataError(f"{path}: {absent(path)} (a datatrove .ds file)")
        index_path = Path(f"{path}.index")
        if not index_path.is_file():
            raise DataError(f"{index_path}: {absent(index_path)} (a datatrove .ds file needs its .ds.index)")
        index_size = index_path.stat().st_size
        if index_size % 8:
            raise DataError(f"{index_path}: size {index_size} is not a multiple of 8 (uint64 document ends)")
        self.index_path = index_path
        self.ends = (np.memmap(index_path, dtype="<u8", mode="r") if index_size
                     else np.zeros(0, dtype="<u8"))
        tokens = int(self.ends[-1]) if len(self.ends) else 0
        tokenizer, token_size = _read_metadata(Path(f"{path}.metadata"))
        data_size = path.stat().st_size
        self.tells_token_size = token_size is not None or tokens > 0
        if token_size is None:
            token_size = data_size // tokens if tokens and data_size % tokens == 0 else untold_token_size
        if token_size not in (2, 4):
            raise DataError(f"{path}: token size {token_size} bytes is not 2 or 4")
        self._dtype = np.dtype("<u2" if token_size == 2 else "<u4")
        if data_size < tokens * token_size:
            raise DataError(f"{path}: truncated ({data_size} bytes, the index needs {tokens * token_size})")
        self.data = (np.memmap(path, dtype=self._dtype, mode="r", shape=(tokens,)).view(np.ndarray)
                     if tokens else np.zeros(0, self._dtype))
        self._windows = random_access_map(path, self._dtype, tokens)
        self.metadata = {"format": "datatrove", "num_documents": len(self.ends), "num_tokens": tokens}
        if tokenizer:
            self.metadata["tokenizer"] = {"name": tokenizer}

    @property
    def num_documents(self) -> int:
        return len(self.ends)

    @property
    def num_tokens(self) -> int:
        return len(self.data)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._dtype.newbyteorder("="))

    def document(self, i: int) -> np.ndarray:
        i = self._check_document(i)
        lo, hi = int(self.ends[i - 1]) if i else 0, int(self.ends[i])
        self._check_document_span(i, lo, hi, str(self.index_path))
        return np.array(self.data[lo:hi], dtype=self.dtype)

    def document_lengths(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        stop = self.num_documents if stop is None else min(stop, self.num_documents)
        if start >= stop:
            return np.zeros(0, np.int64)
        ends = np.asarray(self.ends[max(start - 1, 0):stop], dtype=np.int64)
        return np.diff(ends) if start else np.diff(np.concatenate([[0], ends]))

    def tokens(self, start: int, length: int) -> np.ndarray:
        self._check_range(start, length)
        return np.asarray(self.data[start:start + length]).astype(self.dtype)

    def read_windows(self, out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> int:
        return self._read_windows_from(self._windows, out, rows, starts)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return self.data[np.asarray(positions, dtype=np.int64)].astype(np.int64)

    def verify(self, progress: bool = False) -> None:
        from .verify import check_tokens_and_sidecar
        path = Path(self.path)
        size = path.stat().st_size
        if size != self.num_tokens * self._dtype.itemsize:
            raise DataError(f"{path}: {size} bytes, its index describes {self.num_tokens * self._dtype.itemsize}")
        previous = 0
        for lo in tqdm(range(0, len(self.ends), _CHUNK), desc="index", unit="chunk", disable=not progress):
            ends = np.asarray(self.ends[lo:lo + _CHUNK], dtype=np.int64)
            steps = np.diff(np.concatenate([[previous], ends]))
            if np.any(steps < 0):
                bad = lo + int(np.argmin(steps))
                raise DataError(f"{self.index_path}: document end {bad} goes backwards")
            previous = int(ends[-1])
        check_tokens_and_sidecar(self, progress)
