"""Reader for datatrove / nanotron tokenized files, the format of SmolLM2's own corpus tooling.

Format facts (datatrove `pipeline/tokens/tokenizer.py`, `utils/dataset.py`; no header anywhere):
- `NAME.ds`: the documents' tokens concatenated, little-endian, 2 bytes per token (uint16) or 4 (uint32);
- `NAME.ds.index`: little-endian uint64 end offset (in tokens, exclusive) of each document;
- `NAME.ds.metadata` (optional): text lines `TOKENIZER[|TOKEN_SIZE]`, token count, human-readable count.
A dataset is one `.ds` file or a folder of them (nanotron's Nanoset reads `FOLDER/*.ds` in sorted order);
the stream of a folder is its files' streams concatenated in that order. The token size comes from the
metadata's `|N` suffix or, for older files without it, from the file size divided by the index's last end.

Hand-written because datatrove's own reader is a torch Dataset of fixed windows, not random access by token.
"""
from __future__ import annotations

import bisect
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .store import TokenStore

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


class _DsFile:
    def __init__(self, path: Path):
        self.path = path
        index_path = Path(f"{path}.index")
        if not index_path.is_file():
            raise DataError(f"{index_path}: missing (a datatrove .ds file needs its .ds.index)")
        index_size = index_path.stat().st_size
        if index_size % 8:
            raise DataError(f"{index_path}: size {index_size} is not a multiple of 8 (uint64 document ends)")
        self.index_path = index_path
        self.ends = (np.memmap(index_path, dtype="<u8", mode="r") if index_size
                     else np.zeros(0, dtype="<u8"))
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0
        self.tokenizer, token_size = _read_metadata(Path(f"{path}.metadata"))
        data_size = path.stat().st_size
        if token_size is None:
            token_size = data_size // self.num_tokens if self.num_tokens and data_size % self.num_tokens == 0 \
                else 2
        if token_size not in (2, 4):
            raise DataError(f"{path}: token size {token_size} bytes is not 2 or 4")
        self.dtype = np.dtype("<u2" if token_size == 2 else "<u4")
        if data_size < self.num_tokens * token_size:
            raise DataError(f"{path}: truncated ({data_size} bytes, the index needs {self.num_tokens * token_size})")
        self.data = (np.memmap(path, dtype=self.dtype, mode="r", shape=(self.num_tokens,)).view(np.ndarray)
                     if self.num_tokens else np.zeros(0, self.dtype))


def _read_metadata(path: Path) -> tuple[Optional[str], Optional[int]]:
    if not path.is_file():
        return None, None
    first = path.read_text(errors="replace").splitlines()[:1]
    if not first:
        return None, None
    name, _, size = first[0].rpartition("|")
    if name and size.isdigit():
        return name, int(size)
    return first[0], None


class DatatroveStore(TokenStore):
    format = "datatrove"

    def __init__(self, path: Path):
        super().__init__(str(path))
        paths = sorted(path.glob("*.ds")) if path.is_dir() else [path]
        self.files = [_DsFile(p) for p in paths]
        dtypes = {f.dtype for f in self.files}
        if len(dtypes) > 1:
            raise DataError(f"{path}: its .ds files mix token sizes ({', '.join(sorted(d.name for d in dtypes))})")
        self._dtype = self.files[0].dtype
        self._token_starts = np.cumsum([0] + [f.num_tokens for f in self.files]).tolist()
        self._doc_starts = np.cumsum([0] + [len(f.ends) for f in self.files]).tolist()
        names = {f.tokenizer for f in self.files if f.tokenizer}
        self.metadata = {"format": "datatrove", "num_documents": self._doc_starts[-1],
                         "num_tokens": self._token_starts[-1]}
        if names:
            self.metadata["tokenizer"] = {"name": sorted(names)[0]}

    @property
    def num_documents(self) -> int:
        return self._doc_starts[-1]

    @property
    def num_tokens(self) -> int:
        return self._token_starts[-1]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._dtype.newbyteorder("="))

    def _doc_bounds(self, i: int) -> tuple[_DsFile, int, int]:
        k = bisect.bisect_right(self._doc_starts, i) - 1
        f, j = self.files[k], i - self._doc_starts[k]
        return f, (int(f.ends[j - 1]) if j else 0), int(f.ends[j])

    def document(self, i: int) -> np.ndarray:
        f, lo, hi = self._doc_bounds(self._check_document(i))
        return np.array(f.data[lo:hi])

    def document_lengths(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        stop = self.num_documents if stop is None else min(stop, self.num_documents)
        parts = []
        for k, f in enumerate(self.files):
            lo, hi = max(start - self._doc_starts[k], 0), min(stop - self._doc_starts[k], len(f.ends))
            if lo < hi:
                ends = np.asarray(f.ends[max(lo - 1, 0):hi], dtype=np.int64)
                parts.append(np.diff(ends) if lo else np.diff(np.concatenate([[0], ends])))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def tokens(self, start: int, length: int) -> np.ndarray:
        self._check_range(start, length)
        out, pos, end = [], start, start + length
        while pos < end:
            k = bisect.bisect_right(self._token_starts, pos) - 1
            f, base = self.files[k], self._token_starts[k]
            take = min(end, base + f.num_tokens) - pos
            out.append(np.asarray(f.data[pos - base:pos - base + take]))
            pos += take
        return np.concatenate(out).astype(self.dtype) if out else np.zeros(0, self.dtype)

    def read_windows(self, out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> None:
        if len(self.files) > 1:  # windows may straddle two files
            return super().read_windows(out, rows, starts)
        self._read_windows_from(self.files[0].data, out, rows, starts)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        k = np.searchsorted(np.array(self._token_starts), positions, side="right") - 1
        for f_index in np.unique(k).tolist():
            sel = k == f_index
            out[sel] = self.files[f_index].data[positions[sel] - self._token_starts[f_index]]
        return out

    def verify(self, progress: bool = False) -> None:
        from .verify import check_tokens_and_sidecar
        for f in tqdm(self.files, desc="index", unit="file", disable=not progress or len(self.files) < 2):
            size = f.path.stat().st_size
            if size != f.num_tokens * f.dtype.itemsize:
                raise DataError(f"{f.path}: {size} bytes, its index describes {f.num_tokens * f.dtype.itemsize}")
            previous = 0
            for lo in range(0, len(f.ends), _CHUNK):
                ends = np.asarray(f.ends[lo:lo + _CHUNK], dtype=np.int64)
                steps = np.diff(np.concatenate([[previous], ends]))
                if np.any(steps < 0):
                    bad = lo + int(np.argmin(steps))
                    raise DataError(f"{f.index_path}: document end {bad} goes backwards")
                previous = int(ends[-1])
        check_tokens_and_sidecar(self, progress)
