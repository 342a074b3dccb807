"""Documents stored in a seeded random order (`preprocess --shuffle`), in front of any store writer.

`ShufflingWriter` takes documents as they are tokenized (in input order) into a raw temporary file beside the
output; `finalize()` then hands them to the real writer (Megatron or zarr) in the order
`numpy.random.default_rng(seed).permutation(n)` gives, so document j of the store is input document order[j]. The
permuted pass reads the temporary file by document in batches of at most SHUFFLE_BATCH documents and
SHUFFLE_BATCH_TOKENS tokens (memory: 24 bytes per document plus ~30 bytes per token of a batch, ~130 MB; a longer
document is copied alone, as one slice) and
writes the store sequentially, once: the same I/O as shuffling a written Megatron .bin in place, and a compressed
zarr store is not compressed twice.

Hand-written: no library shuffles variable-length records out of core.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from .files import DocumentSpill, SpillingWriter, temp_path

SHUFFLE_BATCH = 1 << 14  # documents gathered at a time, at most
SHUFFLE_BATCH_TOKENS = 1 << 22  # and their tokens, at most (unless one document alone is longer)


class ShufflingWriter(SpillingWriter):
    """The writer interface (add_documents, finalize, abort, num_documents, num_tokens, dtype) of `writer`, with
    the documents reordered at finalize()."""

    def __init__(self, writer, output: str | os.PathLike, seed, progress: bool = False):
        self.writer = writer
        self.dtype = writer.dtype
        self.seed = seed
        self.progress = progress
        output = os.fspath(output)
        self._spill = DocumentSpill(*map(temp_path, self.staged_paths(output)), self.dtype)

    @staticmethod
    def staged_paths(output: str | os.PathLike) -> list[str]:
        """The names of the unshuffled copy beside `output` (staged under `temp_path` of each): what
        files.remove_abandoned_temps removes for it (the store writer's own are its own)."""
        return [f"{os.fspath(output)}.unshuffled", f"{os.fspath(output)}.unshuffled-lengths"]

    def finalize(self, sidecar: Optional[dict[str, Any]] = None) -> None:
        self._spill.close()
        try:
            lengths = np.fromfile(self._spill.lengths_path, dtype=np.int32).astype(np.int64)
            starts = np.cumsum(lengths) - lengths
            order = np.random.default_rng(self.seed).permutation(len(lengths))
            data = (np.memmap(self._spill.tokens_path, dtype=self.dtype, mode="r") if self.num_tokens
                    else np.zeros(0, self.dtype))
            with tqdm(total=self.num_tokens, unit="tok", unit_scale=True, desc="shuffle",
                      disable=not self.progress) as bar:
                lo = 0
                while lo < len(order):
                    docs = order[lo:lo + SHUFFLE_BATCH]
                    size = lengths[docs]
                    ends = np.cumsum(size)
                    count = max(1, int(np.searchsorted(ends, SHUFFLE_BATCH_TOKENS, side="right")))
                    docs, size, ends = docs[:count], size[:count], ends[:count]
                    if count == 1:  # a document as long as a batch or longer: one slice, no positions
                        tokens = np.array(data[starts[docs[0]]:starts[docs[0]] + size[0]])
                    else:  # token positions of the batch's documents, one after another
                        tokens = data[np.repeat(starts[docs] - (ends - size), size) + np.arange(ends[-1])]
                    self.writer.add_documents(tokens, size)
                    bar.update(int(ends[-1]))
                    lo += count
            del data
            self.writer.finalize(sidecar)
        finally:
            self._spill.remove()

    def abort(self) -> None:
        try:
            self._spill.remove()
        finally:
            self.writer.abort()

    def is_complete(self) -> bool:
        return self.writer.is_complete()
