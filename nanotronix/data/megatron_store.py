"""Megatron-Core indexed dataset (`PREFIX.bin` + `PREFIX.idx`): writer and reader, byte-compatible with
Megatron-LM's `IndexedDatasetBuilder` / `IndexedDataset` (megatron/core/datasets/indexed_dataset.py).

Hand-written rather than imported because Megatron-Core is a heavy dependency for a 34-byte header and three
arrays. The writer keeps bounded memory: sequence lengths are spilled to a temporary file as documents
arrive, and the `.idx` arrays are streamed from it in chunks at the end. Each document is one sequence
(`document_indices = [0, 1, ..., N]`), as `preprocess_data.py` writes without `--split-sentences`.
The reader memory-maps both files and accepts multi-sequence documents and the multimodal trailer.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import DataError
from .files import (DocumentSpill, SpillingWriter, commit, file_identity, fsync_path, make_folder_durably,
                    os_errors_naming, remove_quietly, replaced_path, temp_path, write_json_atomic)
from .store import TokenStore, absent, checked_sidecar, random_access_map

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count N, document-index length D+1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_CHUNK = 1 << 22  # index entries per streamed chunk (32 MiB of int64)


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's `DType.optimal_dtype`: uint16 when the vocabulary is below 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def sidecar_path(prefix: str) -> Path:
    return Path(f"{prefix}.meta.json")


def megatron_prefix(spec: str) -> Optional[str]:
    """The prefix of the Megatron store that `spec` names, or None if there is none."""
    for candidate in (spec, spec[:-4] if spec.endswith((".bin", ".idx")) else None):
        if candidate and Path(f"{candidate}.idx").is_file():
            return candidate
    return None


class MegatronWriter(SpillingWriter):
    """Append documents, then `finalize()`; until then only hidden temporary files exist."""

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype, replace: bool = True):
        """replace=False (preprocess without --overwrite): a store that appeared at `prefix` meanwhile (another run
        writing there) is not replaced: finalize() raises a DataError."""
        self.prefix = os.fspath(prefix)
        self.replace = replace
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise DataError(f"Megatron stores cannot hold {self.dtype} tokens")
        make_folder_durably(Path(self.prefix).parent)
        self._spill = DocumentSpill(temp_path(f"{self.prefix}.bin"), temp_path(f"{self.prefix}.lengths"), self.dtype)
        self._staged_index = None  # the .idx's file_identity, once written
        self._set_aside: list[Path] = []  # the replaced store's files (--overwrite), until the new one is whole
        self._placing = False  # finalize() has begun renaming this writer's files into place

    @staticmethod
    def staged_paths(prefix: str | os.PathLike) -> list[str]:
        """Every name this writer stages a file under (`temp_path` of each): what files.remove_abandoned_temps
        removes for it (a replaced store's files set aside included)."""
        prefix = os.fspath(prefix)
        finals = [f"{prefix}.bin", f"{prefix}.idx", str(sidecar_path(prefix))]
        return [*finals, f"{prefix}.lengths", *(str(replaced_path(final)) for final in finals)]

    def add_document(self, tokens: np.ndarray) -> None:
        self.add_documents(np.asarray(tokens), np.array([len(tokens)]))

    def _finals(self) -> list[Path]:
        """The store's files in the order a replaced store's are put back: its .idx (the completion marker) last."""
        return [Path(f"{self.prefix}.bin"), sidecar_path(self.prefix), Path(f"{self.prefix}.idx")]

    def finalize(self, sidecar: Optional[dict[str, Any]] = None) -> None:
        """Write the .idx and flush it and the .bin, set a store being replaced (--overwrite) aside (its .idx first:
        its index must never describe the new tokens), then rename the sidecar, the .bin and finally the .idx (the
        completion marker) into place: between the first rename and the last there is nothing to write, so a run
        killed there leaves the least (no reader takes a .bin or sidecar without its .idx for a store). abort() puts
        the replaced store back when the new one did not get its .idx."""
        self._spill.close()
        idx_tmp = temp_path(f"{self.prefix}.idx")
        try:
            with os_errors_naming(idx_tmp):
                _write_index(idx_tmp, self._spill.lengths_path, self.num_documents, self.dtype)
                fsync_path(idx_tmp)
            with os_errors_naming(self._spill.tokens_path):
                fsync_path(self._spill.tokens_path)
            self._staged_index = file_identity(idx_tmp)
            taken = next((final for final in self._finals() if os.path.lexists(final)), None)
            if taken is not None and not self.replace:  # checked free at the start, minutes ago
                raise DataError(f"--output-prefix {self.prefix}: {taken} appeared while this run tokenized (another "
                                "run writing the same prefix?): left as it is; this run's store is not written")
            for final in reversed(self._finals()):  # .idx first
                self._set_aside.append(final)  # before the rename: a signal is raised once the rename is done
                if os.path.lexists(final):
                    os.replace(final, temp_path(replaced_path(final)))
            self._placing = True  # from here on, what is at the store's names is this writer's
            if sidecar is not None:
                write_json_atomic(sidecar_path(self.prefix), sidecar)
            commit(self._spill.tokens_path, f"{self.prefix}.bin")
            commit(idx_tmp, f"{self.prefix}.idx")
            for final in self._set_aside:
                remove_quietly(temp_path(replaced_path(final)))
            self._set_aside = []
        finally:
            remove_quietly(idx_tmp)
            remove_quietly(self._spill.lengths_path)

    def abort(self) -> None:
        """Remove what this writer staged and, when finalize() stopped before the .idx was in place, the .bin and
        sidecar it put there (without their .idx they are no store, and a retry would be refused for the .bin in its
        way), then put a replaced store back whole; once the .idx is in place, the new store stands."""
        self._spill.remove()
        remove_quietly(temp_path(sidecar_path(self.prefix)))
        complete = self.is_complete()
        if self._placing and not complete:
            remove_quietly(f"{self.prefix}.bin")
            remove_quietly(sidecar_path(self.prefix))
        for final in [f for f in self._finals() if f in self._set_aside]:  # its .idx last
            aside = temp_path(replaced_path(final))
            if not os.path.lexists(aside):
                continue
            if complete:
                remove_quietly(aside)
            else:
                os.replace(aside, final)
        self._set_aside = []

    def is_complete(self) -> bool:
        """Whether finalize() renamed this writer's .idx into place (the store is whole), even when it was stopped
        after that rename."""
        return self._staged_index is not None and file_identity(f"{self.prefix}.idx") == self._staged_index


def _write_index(path: Path, lengths_file: Path, n: int, dtype: np.dtype) -> None:
    itemsize = dtype.itemsize
    lengths = np.memmap(lengths_file, dtype=np.int32, mode="r") if n else np.zeros(0, np.int32)
    with open(path, "wb") as out:
        out.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[dtype], n, n + 1))
        for lo in range(0, n, _CHUNK):
            out.write(np.ascontiguousarray(lengths[lo:lo + _CHUNK]).tobytes())
        byte_offset = 0
        for lo in range(0, n, _CHUNK):
            chunk = lengths[lo:lo + _CHUNK].astype(np.int64) * itemsize
            pointers = np.cumsum(chunk) - chunk + byte_offset
            byte_offset += int(chunk.sum())
            out.write(pointers.tobytes())
        for lo in range(0, n + 1, _CHUNK):
            out.write(np.arange(lo, min(lo + _CHUNK, n + 1), dtype=np.int64).tobytes())
    del lengths


class MegatronStore(TokenStore):
    format = "megatron"

    def __init__(self, prefix: str):
        super().__init__(prefix)
        self.idx_path, self.bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        if not self.idx_path.is_file():
            raise DataError(f"token store {prefix}: {self.idx_path} {absent(self.idx_path)}")
        if not self.bin_path.is_file():
            raise DataError(f"{self.bin_path}: {absent(self.bin_path)} (the .idx is there)")
        idx_size = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise DataError(f"{self.idx_path}: damaged header ({idx_size} bytes, a header needs {HEADER.size})")
        magic, version, code, n, doc_count = HEADER.unpack(head)
        if magic != MAGIC:
            raise DataError(f"{self.idx_path}: damaged header (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise DataError(f"{self.idx_path}: damaged header (version {version}, expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{self.idx_path}: damaged header (unknown dtype code {code})")
        if doc_count < 1:
            raise DataError(f"{self.idx_path}: damaged header (document index length {doc_count} < 1)")
        base = HEADER.size + 12 * n + 8 * doc_count
        if idx_size not in (base, base + n):
            raise DataError(f"{self.idx_path}: size {idx_size} bytes does not match its header (N={n} "
                            f"sequences, {doc_count - 1} documents: expected {base} bytes)")
        self.multimodal = idx_size == base + n and n > 0
        self._dtype = np.dtype(DTYPE_CODES[code])
        self.num_sequences = n
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r") if idx_size else None
        self.sequence_lengths = idx[HEADER.size:HEADER.size + 4 * n].view(np.int32)
        self.sequence_pointers = idx[HEADER.size + 4 * n:HEADER.size + 12 * n].view(np.int64)
        self.document_indices = idx[HEADER.size + 12 * n:base].view(np.int64)
        first_doc, last_doc = int(self.document_indices[0]), int(self.document_indices[-1])
        if (first_doc, last_doc) != (0, n):  # what Megatron's IndexedDataset asserts when it opens a store
            raise DataError(f"{self.idx_path}: damaged index (document indices run {first_doc}..{last_doc}, "
                            f"expected 0..{n})")
        # The stream's length from the last entry (O(1), no pass over the index).
        self._num_tokens = 0
        if n:
            last_pointer, last_length = int(self.sequence_pointers[-1]), int(self.sequence_lengths[-1])
            if last_pointer < 0 or last_length < 0:
                raise DataError(f"{self.idx_path}: damaged index (its last sequence starts at byte {last_pointer} "
                                f"and holds {last_length} tokens)")
            if last_pointer % self._dtype.itemsize:
                raise DataError(f"{self.idx_path}: damaged index (its last sequence starts at byte {last_pointer}, "
                                f"inside a {self._dtype.itemsize}-byte token)")
            end_byte = last_pointer + last_length * self._dtype.itemsize
            self._num_tokens = end_byte // self._dtype.itemsize
        bin_size = self.bin_path.stat().st_size
        if bin_size < self._num_tokens * self._dtype.itemsize:
            raise DataError(f"{self.bin_path}: truncated ({bin_size} bytes, the index needs "
                            f"{self._num_tokens * self._dtype.itemsize})")
        # A plain ndarray view of the memmap: slicing it skips np.memmap's per-slice subclass overhead.
        self._bin = (np.memmap(self.bin_path, dtype=self._dtype, mode="r", shape=(self._num_tokens,))
                     .view(np.ndarray) if self._num_tokens else np.zeros(0, self._dtype))
        self._windows = random_access_map(self.bin_path, self._dtype, self._num_tokens)
        meta = sidecar_path(prefix)
        if meta.is_dir():  # optional (Megatron's own tools write none), but a folder of its name is a copy gone wrong
            raise DataError(f"{meta}: {absent(meta)} (the store's sidecar)")
        if meta.is_file():
            try:
                sidecar = json.loads(meta.read_text())
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the JSON reader recurses
                raise DataError(f"{meta}: not valid JSON") from None
            self.metadata = checked_sidecar(sidecar, str(meta))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _sequence_span(self, first: int, stop: int) -> tuple[int, int]:
        """Token range [lo, hi) of sequences [first, stop) in the .bin."""
        if stop <= first:
            return 0, 0
        lo = int(self.sequence_pointers[first]) // self._dtype.itemsize
        hi = int(self.sequence_pointers[stop - 1]) // self._dtype.itemsize + int(self.sequence_lengths[stop - 1])
        return lo, hi

    def document(self, i: int) -> np.ndarray:
        i = self._check_document(i)
        first, stop = int(self.document_indices[i]), int(self.document_indices[i + 1])
        if not 0 <= first <= stop <= self.num_sequences:
            raise DataError(f"{self.idx_path}: damaged index (document {i} spans sequences [{first}, {stop}) of "
                            f"{self.num_sequences}; tools/inspect_store.py PREFIX --verify)")
        self._check_sequences(i, first, stop)
        lo, hi = self._sequence_span(first, stop)
        return np.array(self._bin[lo:hi])

    def _check_sequences(self, i: int, first: int, stop: int) -> None:
        """That sequences [first, stop) of document i are whole tokens one after another inside the stream, as
        `_sequence_span` reads them: an edited pointer or length would otherwise be read as the tokens of another
        place (a negative one from the end), or cut short where the .bin ends, without a word. O(its sequences)."""
        if stop <= first:
            return
        size = self._dtype.itemsize
        lengths = np.asarray(self.sequence_lengths[first:stop], dtype=np.int64) * size
        pointers = np.asarray(self.sequence_pointers[first:stop], dtype=np.int64)
        # pointers compared with the stream's end less each length: no sum that could pass int64 and wrap
        if (lengths.min() < 0 or pointers.min() < 0 or np.any(pointers % size)
                or np.any(pointers > self._num_tokens * size - lengths)
                or np.any(pointers[1:] != pointers[:-1] + lengths[:-1])):
            raise DataError(f"{self.idx_path}: damaged index (document {i}'s sequences [{first}, {stop}) are not whole "
                            f"tokens one after another inside the {self._num_tokens}-token stream; "
                            "tools/inspect_store.py PREFIX --verify)")

    def document_lengths(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        stop = self.num_documents if stop is None else min(stop, self.num_documents)
        bounds = np.asarray(self.document_indices[start:stop + 1], dtype=np.int64)
        if np.array_equal(bounds, np.arange(start, stop + 1)):  # one sequence per document
            return np.asarray(self.sequence_lengths[start:stop], dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(self.sequence_lengths[bounds[0]:bounds[-1]], dtype=np.int64)])
        return np.diff(cum[bounds - bounds[0]])

    def tokens(self, start: int, length: int) -> np.ndarray:
        self._check_range(start, length)
        return np.array(self._bin[start:start + length])

    def read_windows(self, out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> int:
        return self._read_windows_from(self._windows, out, rows, starts)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self._bin[np.asarray(positions, dtype=np.int64)], dtype=np.int64)

    def verify(self, progress: bool = False) -> None:
        from .verify import check_index_arrays
        bin_size = self.bin_path.stat().st_size
        if bin_size != self._num_tokens * self._dtype.itemsize:
            raise DataError(f"{self.bin_path}: {bin_size} bytes, the index describes "
                            f"{self._num_tokens * self._dtype.itemsize}")
        check_index_arrays(self, progress)
