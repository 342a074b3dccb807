"""Optional zarr v3 token store: chunked, zstd-compressed, readable from any fsspec URL (s3://, gs://,
file://, memory://), for corpora kept in object storage.

Layout of `NAME.zarr` (a zarr v3 group):
- `tokens`: 1-D array of all documents' tokens (uint16 when the vocabulary fits, else int32), sharded in
  2^20-token shards of 2^14-token zstd chunks, so a random 2049-token window decodes ~16K tokens, not 1M;
- `document_ends`: 1-D int64, exclusive end offset of each document in `tokens` (as datatrove's .ds.index);
- group attributes: the sidecar (tokenizer, counts, inputs, skipped records).
The writer appends in whole shards (bounded memory) into a hidden temporary folder renamed at the end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import DataError, require_module
from .files import commit, file_identity, remove_quietly, replaced_path, temp_path
from .store import TokenStore, checked_sidecar, largest_id

SHARD = 1 << 20
INNER_CHUNK = 1 << 14
_READ_CHUNK = 1 << 22


def zarr_output_path(prefix: str) -> str:
    return prefix if prefix.endswith(".zarr") else f"{prefix}.zarr"


def zarr_path(spec: str) -> Optional[str]:
    """The zarr store that `spec` names (local folder, `spec.zarr`, or a URL), or None."""
    if "://" in spec:
        return spec
    for candidate in (spec, f"{spec}.zarr"):
        if Path(candidate, "zarr.json").is_file():
            return candidate
    return None


def _codecs():
    return require_module("zarr.codecs", "the zarr token store").ZstdCodec(level=3)


class _AppendBuffer:
    """Appends to a 1-D zarr array in whole `block`-sized pieces."""

    def __init__(self, array, block: int):
        self.array, self.block = array, block
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def append(self, values: np.ndarray) -> None:
        self.parts.append(values)
        self.buffered += len(values)
        if self.buffered >= self.block:
            self.flush(whole_blocks_only=True)

    def flush(self, whole_blocks_only: bool = False) -> None:
        if not self.parts:
            return
        data = np.concatenate(self.parts)
        n = (len(data) // self.block) * self.block if whole_blocks_only else len(data)
        if n:
            self.array.resize((self.written + n,))
            self.array[self.written:self.written + n] = data[:n]
            self.written += n
        rest = data[n:]
        self.parts = [rest] if len(rest) else []
        self.buffered = len(rest)


class ZarrWriter:
    def __init__(self, path: str, dtype: np.dtype, replace: bool = True):
        """replace=False (preprocess without --overwrite): a store that appeared at `path` meanwhile is not replaced."""
        zarr = require_module("zarr", "--format zarr")
        self.replace = replace
        if "://" in path:
            raise DataError(f"--format zarr writes a local folder; got the URL {path} (copy it there afterwards)")
        self.path = path
        self.dtype = np.dtype(dtype)
        self._tmp = temp_path(path)
        remove_quietly(self._tmp)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:  # a writer that fails to start (a full disk) removes the half-made store: no caller holds it to abort
            self._group = zarr.open_group(str(self._tmp), mode="w")
            # every chunk written, those of fill values (zeros: SmolLM2's EOS id) too, so that a chunk file missing
            # is damage that --verify can name (zarr reads one as fill values)
            every_chunk = {"write_empty_chunks": True}
            tokens = self._group.create_array("tokens", shape=(0,), dtype=self.dtype, chunks=(INNER_CHUNK,),
                                              shards=(SHARD,), compressors=_codecs(), config=every_chunk)
            ends = self._group.create_array("document_ends", shape=(0,), dtype=np.int64, chunks=(SHARD,),
                                            compressors=_codecs(), config=every_chunk)
        except BaseException:
            remove_quietly(self._tmp)
            raise
        self._staged = file_identity(self._tmp)  # the folder keeps it when renamed into place
        self._tokens = _AppendBuffer(tokens, SHARD)
        self._ends = _AppendBuffer(ends, SHARD)
        self.num_documents = 0
        self.num_tokens = 0

    @staticmethod
    def staged_paths(path: str) -> list[Path]:
        """Every name this writer stages a folder under (`temp_path` of each; commit() stages the store it replaces):
        what files.remove_abandoned_temps removes for it."""
        return [Path(path), replaced_path(path)]

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        self._tokens.append(np.asarray(flat_tokens, dtype=self.dtype))
        self._ends.append(self.num_tokens + np.cumsum(lengths))
        self.num_documents += len(lengths)
        self.num_tokens += len(flat_tokens)

    def finalize(self, sidecar: Optional[dict[str, Any]] = None) -> None:
        self._tokens.flush()
        self._ends.flush()
        self._group.attrs.update(dict(sidecar or {}, format="zarr"))
        try:
            commit(self._tmp, self.path, replace=self.replace)
        except FileExistsError:  # not --overwrite: checked free at the start, minutes ago
            raise DataError(f"--output-prefix {self.path}: a store appeared there while this run tokenized (another "
                            "run writing the same prefix?): left as it is; this run's store is not written") from None

    def abort(self) -> None:
        remove_quietly(self._tmp)

    def is_complete(self) -> bool:
        """Whether finalize() renamed this writer's folder into place (the store is whole), even when it was stopped
        after that rename."""
        return file_identity(self.path) == self._staged


class ZarrStore(TokenStore):
    format = "zarr"

    def __init__(self, location: str):
        super().__init__(location)
        zarr = require_module("zarr", f"reading the zarr store {location}")
        try:
            group = zarr.open_group(location, mode="r")
            self._tokens = group["tokens"]
            self._ends = group["document_ends"]
        except Exception as e:  # zarr/fsspec raise many kinds: missing store, missing array, no network
            url_note = ("; through a URL only single zarr stores are read: Megatron and .ds stores and folders of "
                        "shards need a local path") if "://" in location else ""
            raise DataError(f"token store not found or not a nanotronix zarr store: {location} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}){url_note}") from None
        self.metadata = checked_sidecar(group.attrs.asdict(), f"{self.path} (attributes)")
        if np.dtype(self._ends.dtype).kind not in "iu":  # its values are token offsets, which int() takes as they are
            raise DataError(f"{location}: its document_ends array holds {np.dtype(self._ends.dtype).name} values, "
                            "not integer token offsets")
        n = self._ends.shape[0]
        self._num_tokens = int(self._read(self._ends, n - 1)) if n else 0
        if self._tokens.shape[0] != self._num_tokens:
            raise DataError(f"{location}: tokens array holds {self._tokens.shape[0]} tokens, document_ends "
                            f"says {self._num_tokens}")

    @property
    def num_documents(self) -> int:
        return self._ends.shape[0]

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._tokens.dtype)

    def _read(self, array, selection, coordinates: bool = False) -> np.ndarray:
        """array[selection] (a coordinate selection: the values at those indices), or one DataError naming the
        store: a chunk that zarr cannot decode (damaged bytes, a data type or chunk shape edited in its zarr.json)
        raises whatever its codec does."""
        return self._zarr_call(array, lambda: np.asarray(array.get_coordinate_selection(selection) if coordinates
                                                         else array[selection]))

    def _zarr_call(self, array, call):
        """call(), which reads `array`; whatever zarr raises becomes one DataError naming the store and the array."""
        try:
            return call()
        except Exception as e:  # zarr and its codecs raise many kinds: ValueError, RuntimeError, ZeroDivisionError
            said = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"{self.path}: its {array.basename} array cannot be read ({type(e).__name__}: {said}); "
                            f"tools/inspect_store.py {self.path} --verify") from None

    def document(self, i: int) -> np.ndarray:
        i = self._check_document(i)
        lo, hi = int(self._read(self._ends, i - 1)) if i else 0, int(self._read(self._ends, i))
        self._check_document_span(i, lo, hi, f"{self.path}/document_ends")
        return self._read(self._tokens, slice(lo, hi))

    def document_lengths(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        stop = self.num_documents if stop is None else min(stop, self.num_documents)
        if start >= stop:
            return np.zeros(0, np.int64)
        ends = np.asarray(self._read(self._ends, slice(max(start - 1, 0), stop)), dtype=np.int64)
        return np.diff(ends) if start else np.diff(np.concatenate([[0], ends]))

    def tokens(self, start: int, length: int) -> np.ndarray:
        self._check_range(start, length)
        return self._read(self._tokens, slice(start, start + length))

    def gather(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if not len(positions):
            return np.zeros(0, np.int64)
        return np.asarray(self._tokens_at(positions), dtype=np.int64)

    def read_windows(self, out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> int:
        """TokenStore.read_windows with one zarr read for many windows instead of one each: zarr fetches the chunks
        a read touches concurrently, so on object storage the windows of a batch wait out one request's round trip,
        not one each (`python tools/bench_loader.py --zarr`: 64 windows of 2,049 tokens at 20 ms a request, 2.9 s
        one by one, ~0.3 s at once); on a local disk it also halves zarr's per-call cost at 256 windows."""
        length, top = out.shape[1], -1
        starts = np.asarray(starts, dtype=np.int64)
        block = max(1, _READ_CHUNK // max(length, 1))  # windows per read: positions and values of <= 4M tokens
        for lo in range(0, len(starts), block):
            part = starts[lo:lo + block]
            for start in (int(part.min()), int(part.max())):  # the ends of the block's range: all of it inside
                self._check_range(start, length)
            if not length:
                continue
            tokens = self._tokens_at((part[:, None] + np.arange(length, dtype=np.int64)).ravel())
            out[rows[lo:lo + block]] = tokens.reshape(len(part), length)
            top = max(top, largest_id(tokens))
        return top

    def _tokens_at(self, positions: np.ndarray) -> np.ndarray:
        """The stream's tokens at `positions` (int64, not empty), in the store's dtype: one slice read where they lie
        within _READ_CHUNK tokens of each other (consecutive windows, as validation reads), else one coordinate
        selection (the chunks they touch fetched concurrently)."""
        lo, hi = int(positions.min()), int(positions.max()) + 1
        if hi - lo <= _READ_CHUNK:
            return self._read(self._tokens, slice(lo, hi))[positions - lo]
        return self._read(self._tokens, positions, coordinates=True)

    def verify(self, progress: bool = False) -> None:
        from .verify import check_tokens_and_sidecar
        for array in (self._tokens, self._ends):
            found, expected, kind = self._zarr_call(array, lambda: _stored_files(array))
            if found < expected:  # zarr reads a missing chunk file as its fill value; the writer writes every one
                raise DataError(f"{self.path}: its {array.basename} array is missing {kind} files ({found} of its "
                                f"{expected} {kind}s stored; zarr would read the others as fill values)")
        previous = 0
        for lo in range(0, self.num_documents, _READ_CHUNK):
            ends = np.asarray(self._read(self._ends, slice(lo, lo + _READ_CHUNK)), dtype=np.int64)
            steps = np.diff(np.concatenate([[previous], ends]))
            if np.any(steps < 0):
                raise DataError(f"{self.path}: document end {lo + int(np.argmin(steps))} goes backwards")
            previous = int(ends[-1])
        check_tokens_and_sidecar(self, progress)


def _stored_files(array) -> tuple[int, int, str]:
    """(files stored, files the array's length needs, what they hold): for a sharded array (the tokens) zarr's
    nchunks_initialized counts every inner chunk of each stored shard, those past the array's end too, against
    nchunks' inner chunks up to its end, so the two made a wrong count (a missing 64-chunk shard said as 4 chunks)."""
    if array.shards is None:
        return array.nchunks_initialized, array.nchunks, "chunk"
    per_shard = array.shards[0] // array.chunks[0]
    return array.nchunks_initialized // per_shard, -(-array.shape[0] // array.shards[0]), "shard"
