"""Token stores made of several: `ConcatenatedStore`, whose stream is its parts' streams one after another, and its
two uses, a datatrove folder of `.ds` files (nanotron's Nanoset reads them so) and a folder of shards written by
`tools/preprocess.py --shard I/N` (a Slurm job array tokenizing a corpus on many machines: `ShardedStore`).
`preprocess --shard` splits the sorted inputs (large files cut into pieces first: data/inputs.py) into N contiguous
runs, so a sharded store's stream is token for token the one a single `preprocess` of the same inputs writes.

A shard is `FOLDER/shard-IIIII-of-NNNNN` in either writable format (Megatron `.bin/.idx` + sidecar, or `.zarr`);
it exists only once complete (its writer renames it into place last). The folder opens only when all N shards are
there, so a job array with a failed task never looks like a finished dataset. Parts must agree on the format, the
token dtype and the tokenizer (sidecar sha256, or name).

Hand-written: no store library concatenates Megatron or zarr stores without copying them (Megatron's
`merge_datasets.py` rewrites one big file).
"""
from __future__ import annotations

import bisect
import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import DataError
from .store import TokenStore, largest_id

# at least 5 digits: shard_name writes more past 99999 (--shard I/N takes any N), which must not go unseen
# [0-9], not \d, which takes any script's decimal digits (int() reads them): shard_name writes ASCII; \Z, not $, which
# also matches before a final line break
_SHARD = re.compile(r"^shard-([0-9]{5,})-of-([0-9]{5,})(\.idx|\.zarr)\Z")
_SHARD_FILE = re.compile(r"^shard-([0-9]{5,})-of-[0-9]{5,}\.")  # any file of a shard: .bin, .idx, .meta.json, .zarr


def shard_name(index: int, count: int) -> str:
    """The file name (without suffix) of shard `index` of `count`."""
    return f"shard-{index:05d}-of-{count:05d}"


def sharded_folder(spec: str) -> Optional[Path]:
    """`spec` if it is a folder holding preprocess shards, else None."""
    path = Path(spec)
    if path.is_dir() and any(_SHARD.match(p.name) for p in path.iterdir()):
        return path
    return None


def inputs_fingerprint(pieces, text_ratio: Optional[dict] = None) -> str:
    """sha256 of the whole input listing a shard was cut from (each file's path below the inputs' common folder,
    its size, and the text per byte the cuts counted it at where that is not 1: a task whose decompressor found
    another would cut elsewhere), recorded in every shard's sidecar: shards of one folder must agree on it."""
    paths = [os.path.abspath(p.path) for p in pieces]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
    ratio = text_ratio or {}
    listing = "\n".join(f"{os.path.relpath(path, root)}\t{p.nbytes}"
                        + (f"\t{ratio[p.path]!r}" if ratio.get(p.path, 1.0) != 1.0 else "")
                        for path, p in zip(paths, pieces))
    return hashlib.sha256(listing.encode()).hexdigest()


def split_inputs(sizes: list[int], index: int, count: int) -> tuple[int, int]:
    """Shard `index` of `count`: the [start, stop) run of the input pieces (in their order, of these sizes: bytes of
    text) it tokenizes. Cuts fall at the piece boundaries nearest to equal shares; every shard gets at least one."""
    if not 0 <= index < count:
        raise DataError(f"--shard {index}/{count}: the shard index must be in [0, {count})")
    if count > len(sizes):
        raise DataError(f"--shard {index}/{count}: {count} shards but the inputs make {len(sizes)} piece(s) (a "
                        "text file is one document; a JSON-lines or Parquet file is cut only where it holds more "
                        "than a quarter of a shard's share, and at most at every line, 64 KiB block of a "
                        "compressed file or row group): use fewer shards")
    ends = np.cumsum(np.asarray(sizes, dtype=np.float64))
    total = ends[-1] if len(ends) else 0.0
    cuts = [0]
    for k in range(1, count):
        target = total * k / count
        j = int(np.searchsorted(ends, target))  # the first file ending at or after the target share
        before = ends[j - 1] if j else 0.0
        cut = j + 1 if ends[j] - target < target - before else j  # the nearer of its two boundaries
        cuts.append(min(max(cut, cuts[-1] + 1), len(sizes) - (count - k)))
    cuts.append(len(sizes))
    return cuts[index], cuts[index + 1]


class ConcatenatedStore(TokenStore):
    """The stores `parts` as one: documents and stream in part order."""

    def __init__(self, path: str, parts: list[TokenStore]):
        super().__init__(path)
        self.parts = parts
        formats = {p.format for p in parts}
        dtypes = {np.dtype(p.dtype) for p in parts}
        if len(dtypes) > 1 or len(formats) > 1:
            raise DataError(f"{path}: its parts mix formats or token dtypes ({', '.join(sorted(formats))}; "
                            f"{', '.join(sorted(d.name for d in dtypes))})")
        tokenizers = {p.tokenizer_info.get("sha256") or p.tokenizer_info.get("name") for p in parts} - {None}
        if len(tokenizers) > 1:
            raise DataError(f"{path}: its parts were tokenized with different tokenizers")
        self.format = formats.pop()
        self._dtype = dtypes.pop()
        self._token_starts = np.cumsum([0] + [p.num_tokens for p in parts]).tolist()
        self._doc_starts = np.cumsum([0] + [p.num_documents for p in parts]).tolist()
        described = next((p for p in parts if p.tokenizer_info), parts[0]).metadata
        self.metadata = {key: described[key] for key in ("format", "created_by", "tokenizer", "dtype",
                                                         "eos_appended", "text_key") if key in described}
        self.metadata.update(num_documents=self.num_documents, num_tokens=self.num_tokens, parts=len(parts),
                             skipped={"total": sum((p.metadata.get("skipped") or {}).get("total") or 0
                                                   for p in parts)})

    @property
    def num_documents(self) -> int:
        return self._doc_starts[-1]

    @property
    def num_tokens(self) -> int:
        return self._token_starts[-1]

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _part_of_document(self, i: int) -> tuple[TokenStore, int]:
        k = bisect.bisect_right(self._doc_starts, i) - 1
        return self.parts[k], i - self._doc_starts[k]

    def document(self, i: int) -> np.ndarray:
        part, j = self._part_of_document(self._check_document(i))
        return part.document(j)

    def document_lengths(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        stop = self.num_documents if stop is None else min(stop, self.num_documents)
        pieces = []
        for k, part in enumerate(self.parts):
            lo, hi = max(start - self._doc_starts[k], 0), min(stop - self._doc_starts[k], part.num_documents)
            if lo < hi:
                pieces.append(part.document_lengths(lo, hi))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def tokens(self, start: int, length: int) -> np.ndarray:
        self._check_range(start, length)
        pieces, pos, end = [], start, start + length
        while pos < end:
            k = bisect.bisect_right(self._token_starts, pos) - 1  # the last part starting at or before pos
            base, part = self._token_starts[k], self.parts[k]
            take = min(end, base + part.num_tokens) - pos
            pieces.append(part.tokens(pos - base, take))
            pos += take
        return np.concatenate(pieces).astype(self._dtype) if pieces else np.zeros(0, self._dtype)

    def read_windows(self, out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> int:
        """Windows inside one part are read by that part in one call; the few that straddle two are pieced."""
        rows, starts = np.asarray(rows), np.asarray(starts, dtype=np.int64)
        bounds = np.asarray(self._token_starts, dtype=np.int64)
        first = np.searchsorted(bounds, starts, side="right") - 1
        last = np.searchsorted(bounds, starts + out.shape[1] - 1, side="right") - 1
        inside = first == last
        top = -1
        for k in np.unique(first[inside]).tolist():
            sel = inside & (first == k)
            top = max(top, self.parts[k].read_windows(out, rows[sel], starts[sel] - bounds[k]))
        for row, start in zip(rows[~inside].tolist(), starts[~inside].tolist()):
            tokens = self.tokens(start, out.shape[1])
            out[row] = tokens
            top = max(top, largest_id(tokens))
        return top

    def gather(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        k = np.searchsorted(np.asarray(self._token_starts), positions, side="right") - 1
        for part in np.unique(k).tolist():
            sel = k == part
            out[sel] = self.parts[part].gather(positions[sel] - self._token_starts[part])
        return out

    def verify(self, progress: bool = False) -> None:
        for part in self.parts:
            part.verify(progress)

    @property
    def multimodal(self) -> bool:
        return any(part.multimodal for part in self.parts)

    def summary(self) -> dict:
        return {**super().summary(), "parts": len(self.parts)}


def shard_kinds(folder: Path) -> set[tuple[int, str]]:
    """(N, format) of every `shard-IIIII-of-NNNNN` store in `folder` (one pair for a folder of one split)."""
    try:
        return {(int(m.group(2)), "megatron" if m.group(3) == ".idx" else "zarr")
                for p in folder.iterdir() if (m := _SHARD.match(p.name))}
    except OSError:  # no folder yet
        return set()


class ShardedStore(ConcatenatedStore):
    """A folder of `preprocess --shard` shards, all N of them (else one DataError naming the missing ones)."""

    def __init__(self, folder: Path):
        from .store import open_store

        named: dict[int, list[str]] = {}  # shard index -> its .idx / .zarr names
        counts = set()
        names = sorted(p.name for p in folder.iterdir())
        for name in names:
            m = _SHARD.match(name)
            if m:
                named.setdefault(int(m.group(1)), []).append(name)
                counts.add(int(m.group(2)))
        if len(counts) != 1:
            raise DataError(f"{folder}: shards of different splits ({', '.join(map(str, sorted(counts)))} shards)")
        count = counts.pop()
        twice = next((both for both in named.values() if len(both) > 1), None)
        if twice:  # a .idx and a .zarr of one shard (put there by hand; preprocess refuses): one would go unread
            raise DataError(f"{folder}: {folder / twice[0]} and {folder / twice[1]} are the same shard in two formats "
                            "(preprocess writes one per folder): remove one")
        found = {i: folder / (name[:-4] if name.endswith(".idx") else name) for i, [name] in named.items()}
        # A file numbered past the split (renamed or copied in by hand; any of a shard's files, its .bin too) would
        # otherwise be left out of the dataset without a word.
        stray = next((name for name in names if (m := _SHARD_FILE.match(name)) and int(m.group(1)) >= count), None)
        if stray:
            raise DataError(f"{folder}: {stray} is not one of its {count} shards (they are numbered 0 to "
                            f"{count - 1}): remove or rename it")
        missing = [i for i in range(count) if i not in found]
        if missing:
            listed = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise DataError(f"{folder}: {len(missing)} of {count} shards missing ({listed}): a preprocess task has "
                            f"not finished")
        super().__init__(str(folder), [open_store(found[i]) for i in range(count)])
        for i, part in enumerate(self.parts):  # a shard copied in under another's name would be read twice
            said = part.metadata.get("shard") or {}
            if "index" in said and (said.get("index"), said.get("count")) != (i, count):
                raise DataError(f"{found[i]}: its sidecar says it is shard {said.get('index')} of "
                                f"{said.get('count')}, not {i} of {count} (copied or renamed by hand?): rerun "
                                f"shard {i}")
        listings = {(p.metadata.get("shard") or {}).get("inputs_sha256") for p in self.parts} - {None}
        if len(listings) > 1:
            raise DataError(f"{folder}: its shards were cut from different input listings (files added, removed or "
                            f"resized while the tasks ran, or compressed files decoded differently): rerun every "
                            f"shard")
        self.metadata["shards"] = count
