"""The one reader interface over every token-store format, and `open_store`, which picks the format.

A token store holds documents of token ids (each ending with the tokenizer's EOS id when written by
`tools/preprocess.py`). Besides per-document access, every store exposes its *token stream*: all documents
concatenated in store order, which is what the training sampler cuts into packed windows and what
`nanotronix.evaluate` reads (window i = stream tokens [i*L, i*L + L + 1)).
"""
from __future__ import annotations

import functools
import hashlib
import mmap
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional

import numpy as np

from nanotronix.errors import json_kind

from .errors import DataError
from .tokenizer import local_tokenizer_sha256, names_a_path


# Rows gathered, converted and checked at a time by `TokenStore._read_windows_from`: 32 windows of 2049 tokens are
# 128 KB as uint16 and 256 KB as int32, well inside a core's L2 (32-64 rows were the fastest on the development
# machine's 2 MB-per-core L2; 256 rows and more lost most of the gain).
WINDOW_BLOCK = 32

# A store's content fingerprint (`TokenStore.fingerprint`) hashes this many runs of this many stream tokens, evenly
# spaced: enough that a store rewritten with the same token count (documents reordered, re-tokenized, a shard
# replaced) differs in some of them, and cheap on a 1T-token store on a network file system (256 small reads; on a
# zarr store 256 decoded chunks of 2^14 tokens).
FINGERPRINT_RUNS = 256
FINGERPRINT_RUN_TOKENS = 4


def random_access_map(path: str | os.PathLike, dtype: np.dtype, count: int) -> np.ndarray:
    """The first `count` tokens of the file `path` as a read-only array over a memory map advised MADV_RANDOM: what
    the sampler reads its random windows through. Without the advice a page fault reads the device's whole readahead
    window around the page (8 MiB on the development machine), so a cold window of a few KB cost megabytes of reads:
    1024 random windows of a cold 2 GB store took ~1.1-1.7 s, ~0.13 s advised (tools/bench_loader.py --cold, README
    "Input pipeline"); the content fingerprint reads its runs so too. A map of its own: the store's other reads (verify,
    documents) stream and keep readahead."""
    dtype = np.dtype(dtype)
    if not count:
        return np.zeros(0, dtype)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), count * dtype.itemsize, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):  # Linux and macOS; elsewhere a plain map
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=count)


def largest_id(tokens: np.ndarray) -> int:
    """The largest token id in `tokens` (integers), read as unsigned: a negative id, which a damaged store can
    hold, comes out above every vocabulary. -1 when empty."""
    if not tokens.size:
        return -1
    return above_vocabulary_if_negative(int(np.ascontiguousarray(tokens).view(f"u{tokens.dtype.itemsize}").max()),
                                        tokens.dtype)


def above_vocabulary_if_negative(top: int, dtype: np.dtype) -> int:
    """`top`, the largest of some ids of `dtype` read as unsigned, moved above every vocabulary when it is a negative
    id: read as unsigned, an int8 or int16 -1 is only 255 or 65535, inside a vocabulary larger than that."""
    dtype = np.dtype(dtype)
    return top + (1 << 64) if dtype.kind == "i" and top >= 1 << (8 * dtype.itemsize - 1) else top


def first_outside_vocabulary(tokens: np.ndarray, vocab_size: int) -> Optional[int]:
    """The first token id of `tokens` (integers, any shape) outside [0, vocab_size), or None. Read as unsigned, so
    a negative id, which a damaged store can hold, is found in the same one comparison (and, for the signed dtypes
    too narrow for that, int8 and int16, in a second)."""
    flat = np.ascontiguousarray(tokens).reshape(-1)
    outside = flat.view(f"u{flat.dtype.itemsize}") >= vocab_size
    if flat.dtype.kind == "i" and flat.dtype.itemsize < 4:
        outside |= flat < 0
    outside = np.flatnonzero(outside)
    return int(flat[outside[0]]) if len(outside) else None


def checked_sidecar(metadata: Any, where: str) -> dict[str, Any]:
    """A store's sidecar (Megatron's PREFIX.meta.json, a zarr store's attributes) as read, once the fields that
    readers use have their types: `tokenizer`, `skipped` and `shard` objects; the tokenizer's vocab_size and eos_id,
    the skipped total and the shard's index and count whole numbers; the tokenizer's name and sha256 and the shard's
    inputs_sha256 strings; eos_appended a bool (each may be absent or null). Anything else is a DataError naming
    `where` (a hand-edited sidecar would otherwise fail later, as a traceback: a sha256 of 5 in the tokenizer note, a
    list in a folder of shards' set of tokenizers, a skipped total of "3" in its sum)."""
    def fail(what: str):
        raise DataError(f"{where}: not a token store's sidecar ({what})")

    if not isinstance(metadata, dict):
        fail(f"a JSON {json_kind(metadata)}, not an object")
    for key in ("tokenizer", "skipped", "shard"):
        if not isinstance(metadata.get(key) or {}, dict):
            fail(f"its {key} is {metadata[key]!r}, not an object")
    fields = [("tokenizer", key, int) for key in ("vocab_size", "eos_id")] + [("skipped", "total", int)] + \
        [("shard", key, int) for key in ("index", "count")] + \
        [("tokenizer", key, str) for key in ("name", "sha256")] + [("shard", "inputs_sha256", str)]
    for section, key, kind in fields:
        value = (metadata.get(section) or {}).get(key)
        if value is None:
            continue
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            fail(f"its {section}'s {key} is {value!r}, not a whole number")
        if kind is str and not isinstance(value, str):
            fail(f"its {section}'s {key} is {value!r}, not a string")
    if not isinstance(metadata.get("eos_appended", False), bool):
        fail(f"its eos_appended is {metadata['eos_appended']!r}, not true or false")
    return metadata


def absent(path: str | os.PathLike) -> str:
    """What is wrong with a store file that is not there to read: a folder of its name (a copy gone wrong) is said as
    such, not as "missing", which would send the user looking for a file that is in plain sight."""
    return "is a folder, not a file" if os.path.isdir(path) else "is missing"


def require_integer_tokens(store: "TokenStore", name: str) -> "TokenStore":
    """`store`, once it is known to hold integers: a Megatron file may hold float32/float64 values (the format
    allows them), which are no token ids and would be truncated silently on their way into a batch."""
    if np.dtype(store.dtype).kind not in "iu":
        raise DataError(f"token store {name}: holds {np.dtype(store.dtype).name} values, not integer token ids")
    return store


class TokenStore(ABC):
    format: ClassVar[str]
    multimodal: bool = False  # a megatron-core multimodal store (sequence modes after its index): `multimodal_note`

    def __init__(self, path: str):
        self.path = path  # prefix (Megatron), .ds file (datatrove) or URL/folder (zarr)
        self.metadata: dict[str, Any] = {}  # sidecar contents ({} when the store has none)

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def num_documents(self) -> int: ...

    @property
    @abstractmethod
    def num_tokens(self) -> int: ...

    @property
    @abstractmethod
    def dtype(self) -> np.dtype: ...

    # ---- access ------------------------------------------------------------------------------------
    @abstractmethod
    def document(self, i: int) -> np.ndarray:
        """Token ids of document i (0-based), EOS included when the writer appended one."""

    @abstractmethod
    def document_lengths(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Token counts of documents [start, stop) as int64 (reads only that part of the index)."""

    @abstractmethod
    def tokens(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the concatenated stream from token `start`, in the store's dtype."""

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows of `length` stream tokens beginning at each of `starts`, as an int64 [n, length] array."""
        out = np.empty((len(starts), length), dtype=np.int64)
        self.read_windows(out, np.arange(len(starts)), starts)
        return out

    def leading_windows(self, first: int, count: int, seq_len: int) -> np.ndarray:
        """Windows first .. first + count - 1 cut from the start of the stream without shuffling, window i being
        tokens [i*seq_len, i*seq_len + seq_len + 1): what `nanotronix.evaluate` and the trainer's validation
        score. int64 [count, seq_len + 1]."""
        return self.windows(np.arange(first, first + count, dtype=np.int64) * seq_len, seq_len + 1)

    def read_windows(self, out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> int:
        """Fill out[rows[k]] with the stream tokens from starts[k] (row length = out.shape[1]; rows sorted,
        unique). Returns the largest token id read, in the store's own dtype read as unsigned (so a negative id
        counts as above every vocabulary, and an int64 id that out's dtype would wrap into range is still seen), or
        -1 when no row was: the loader's vocabulary check, done here on rows still in cache."""
        length, top = out.shape[1], -1
        for row, start in zip(rows.tolist(), starts.tolist()):
            tokens = self.tokens(start, length)
            out[row] = tokens
            top = max(top, largest_id(tokens))
        return top

    @staticmethod
    def _read_windows_from(data: np.ndarray, out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> int:
        """read_windows for a stream held in one (memory-mapped) array: a sliding-window view (no copy) gathered
        by one numpy call per block of WINDOW_BLOCK rows, which is faster than a Python loop of slices. In
        blocks, the gathered windows are still in the CPU cache when their largest id is taken and when they are
        converted to out's dtype; a whole 1024 x 2049 batch at once made three passes through memory
        (tools/bench_data.py's sampler: 1.07 -> 0.65 ms for the gather, conversion and check of such a batch). The
        check reads the gathered copy, before the conversion, which is narrower (uint16 for SmolLM2's vocabulary)
        and cannot have wrapped."""
        windows = np.lib.stride_tricks.sliding_window_view(data, out.shape[1])
        starts = np.asarray(starts, dtype=np.int64)
        contiguous = len(rows) == len(out)  # rows are sorted and unique, so this is every row in order
        unsigned = np.dtype(f"u{data.dtype.itemsize}")  # largest_id's reading, without its per-call checks
        top = -1
        for lo in range(0, len(rows), WINDOW_BLOCK):
            block = windows[starts[lo:lo + WINDOW_BLOCK]]  # the gathered copy, in the store's dtype
            top = max(top, int(block.view(unsigned).max()))
            if contiguous:
                out[lo:lo + len(block)] = block
            else:  # converted while scattered: no temporary in out's dtype
                out[rows[lo:lo + WINDOW_BLOCK]] = block
        return above_vocabulary_if_negative(top, data.dtype)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The stream tokens at the given positions (int64)."""
        return np.array([self.tokens(int(p), 1)[0] for p in positions], dtype=np.int64)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (hex) of the token and document counts and of FINGERPRINT_RUNS runs of FINGERPRINT_RUN_TOKENS
        stream tokens evenly spaced from the first to the last token (every token of a smaller store), read as
        int64: a checkpoint keeps it, so a resume can say when a store it read from holds other tokens, even as
        many. A function of the stream alone (what the sampler cuts windows from), so it is the same for any format
        or sharding of one stream, on every rank, without a sidecar. No sample of document lengths: they do not
        change the windows, and on a zarr store each of them spread over the index decodes a 2^20-entry chunk.
        Computed once per opened store; read like the sampler's windows, through the map advised for random
        reads (`random_access_map`), so a cold store costs a few hundred small reads, not a readahead each."""
        n = self.num_tokens
        if n <= FINGERPRINT_RUNS * FINGERPRINT_RUN_TOKENS:  # all of it, as one run
            starts, length = np.zeros(1 if n else 0, dtype=np.int64), n
        else:  # the first run starts at token 0 and the last ends at the last token
            length = FINGERPRINT_RUN_TOKENS
            starts = np.arange(FINGERPRINT_RUNS, dtype=np.int64) * (n - length) // (FINGERPRINT_RUNS - 1)
        digest = hashlib.sha256(np.array([n, self.num_documents], dtype="<i8").tobytes())
        digest.update(np.asarray(self.windows(starts, length), dtype="<i8").tobytes())
        return digest.hexdigest()

    @abstractmethod
    def verify(self, progress: bool = False) -> None:
        """Check every invariant of the format (reads the whole store); raise DataError on the first damage."""

    # ---- facts from the sidecar ---------------------------------------------------------------------
    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return dict(self.metadata.get("tokenizer") or {})

    @property
    def vocab_size(self) -> Optional[int]:
        return self.tokenizer_info.get("vocab_size")

    @property
    def eos_id(self) -> Optional[int]:
        return self.tokenizer_info.get("eos_id")

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "multimodal": self.multimodal,
            "dtype": np.dtype(self.dtype).name,
            "documents": self.num_documents,
            "tokens": self.num_tokens,
            "tokenizer": self.tokenizer_info.get("name"),
            "tokenizer_sha256": self.tokenizer_info.get("sha256"),
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "skipped_records": (self.metadata.get("skipped") or {}).get("total"),
        }

    def _check_range(self, start: int, length: int) -> None:
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise DataError(f"{self.path}: tokens [{start}, {start + length}) are outside the stream of "
                            f"{self.num_tokens} tokens")

    def _check_document(self, i: int) -> int:
        if not 0 <= i < self.num_documents:
            raise DataError(f"{self.path}: no document {i} (the store has {self.num_documents})")
        return int(i)

    def _check_document_span(self, i: int, lo: int, hi: int, where: str) -> None:
        """That document i's tokens [lo, hi), from its store's document ends (`where`), lie inside the stream in
        order: an edited end would otherwise be read as no tokens, as tokens cut short where the stream ends, or (a
        negative one, on zarr) as tokens counted from the end."""
        if not 0 <= lo <= hi <= self.num_tokens:
            raise DataError(f"{where}: damaged index (document {i} spans tokens [{lo}, {hi}) of the "
                            f"{self.num_tokens}-token stream; tools/inspect_store.py {self.path} --verify)")


def tokenizer_note(stores: dict[str, TokenStore], configured: Optional[str] = None,
                   evaluated: bool = False) -> Optional[str]:
    """A warning when the stores' sidecars name different tokenizer files (by sha256), or when `configured`
    (data.tokenizer: a local tokenizer.json or a folder holding one; what the Hugging Face export ships) is another
    file than theirs, or a path holding no tokenizer.json (the export at the run's end would ship none); else None.
    Only a note: two files can hold the same vocabulary (a tokenizer re-saved by another `tokenizers` version), so
    the run goes on. `evaluated`: the stores are scored by a checkpoint whose run named
    `configured` (nanotronix.evaluate), which the note then says."""
    mine = local_tokenizer_sha256(configured)
    if configured and not evaluated and mine is None and names_a_path(configured):
        return (f"data.tokenizer {configured} holds no tokenizer.json (none there, or unreadable): the Hugging Face "
                "export ships data.tokenizer, so it will ship no tokenizer; set it to the stores' tokenizer")
    by_file: dict[str, list[str]] = {}
    for name, store in stores.items():
        sha = store.tokenizer_info.get("sha256")
        if sha:
            by_file.setdefault(sha, []).append(name)
    groups = "; ".join(f"{sha[:12]}: {', '.join(names)}" for sha, names in by_file.items())
    if len(by_file) >= 2:
        return (f"token stores were written with {len(by_file)} different tokenizer files ({groups}); unless they "
                f"hold the same vocabulary, the ids mean different tokens")
    if mine and by_file and mine not in by_file and evaluated:
        return (f"the checkpoint's run names data.tokenizer {configured} ({mine[:12]}), another file than the one the "
                f"store was written with ({groups}); unless they hold the same vocabulary, the loss scores the model "
                f"on ids that mean other tokens than in its training")
    if mine and by_file and mine not in by_file:
        return (f"data.tokenizer {configured} ({mine[:12]}) is another file than the one the token stores were "
                f"written with ({groups}); the Hugging Face export ships data.tokenizer, so unless they hold the same "
                f"vocabulary, set it to the stores' tokenizer")
    return None


def multimodal_note(stores: dict[str, TokenStore]) -> Optional[str]:
    """A note naming the stores written by megatron-core with `multimodal=True` (their .idx ends in one mode byte per
    sequence): what the modes mean is the writer's (an image sequence's values are no token ids), and the sampler
    reads every sequence as text tokens; None when no store is one."""
    names = [name for name, store in stores.items() if store.multimodal]
    if not names:
        return None
    return (f"token stores {', '.join(names)} are multimodal Megatron stores (their .idx holds a mode per sequence): "
            "the modes are ignored and every sequence is trained on as text tokens")


def document_eos_mismatch(stores: dict[str, TokenStore], eos_id: Optional[int]) -> Optional[str]:
    """What is wrong when model.document_mask_eos_id is not the EOS id a store's sidecar records (documents would be
    cut at an ordinary token, and the real boundaries left unmasked); None when it matches, when masking is off, or
    when the stores record no EOS (Megatron's own tools write no sidecar)."""
    if eos_id is None:
        return None
    for name, store in stores.items():
        if store.eos_id is not None and store.eos_id != eos_id:
            return (f"model.document_mask_eos_id: {eos_id}, but token store {name} ends its documents with id "
                    f"{store.eos_id} (its sidecar): documents would be cut at another token")
    return None


def stores_named(spec: str) -> list[tuple[str, str]]:
    """(kind, where) of each token store that the local name `spec` opens, in open_store's order: a folder of
    preprocess shards ("shards"), a Megatron prefix ("megatron"), a datatrove .ds ("datatrove"), a zarr folder
    ("zarr"). Two are one name for two stores (`tokens.bin/.idx` beside a later `--format zarr` run's
    `tokens.zarr`): open_store refuses to pick one, preprocess to add the second."""
    from .datatrove_store import datatrove_path
    from .megatron_store import megatron_prefix
    from .sharded_store import sharded_folder
    from .zarr_store import zarr_path

    found = [("shards", sharded_folder(spec)), ("megatron", megatron_prefix(spec)), ("datatrove", datatrove_path(spec)),
             ("zarr", zarr_path(spec))]
    shown = {"shards": "{}/ (preprocess shards)", "megatron": "{}.bin/.idx"}
    return [(kind, shown.get(kind, "{}").format(where)) for kind, where in found if where is not None]


def open_store(path_or_prefix: str | os.PathLike) -> TokenStore:
    """Open a token store, recognising the format from the files present.

    Accepted: a Megatron prefix (or its `.bin`/`.idx` file), a datatrove `.ds` file (or its path without
    `.ds`), a zarr store folder or fsspec URL (`s3://...`, `file://...`, `memory://...`), a folder of
    `preprocess --shard` shards (one dataset, `sharded_store.py`). A local path may start with `~` (as the trainer's
    dataset paths may: `--data=~/corpus` reaches evaluate and inspect_store unexpanded).
    """
    from .megatron_store import MegatronStore, megatron_prefix
    from .sharded_store import ShardedStore, sharded_folder

    spec = os.fspath(path_or_prefix)
    if "://" not in spec:
        spec = os.path.expanduser(spec)
        named = stores_named(spec)
        if len(named) > 1:  # which one a run reads would be this function's order, said nowhere
            raise DataError(f"token store {spec}: names {len(named)} stores ({', '.join(where for _, where in named)}):"
                            " name one by its own path (PREFIX.bin, PREFIX.zarr, FOLDER/) or remove the other")
    folder = sharded_folder(spec)
    if folder is not None:
        return ShardedStore(folder)
    prefix = megatron_prefix(spec)
    if prefix is not None:
        return MegatronStore(prefix)
    from .datatrove_store import datatrove_path, open_datatrove
    ds = datatrove_path(spec)
    if ds is not None:
        return open_datatrove(ds)
    from .zarr_store import ZarrStore, zarr_path
    zarr_location = zarr_path(spec)
    if zarr_location is not None:
        return ZarrStore(zarr_location)
    for prefix in (spec, spec[:-4] if spec.endswith((".bin", ".idx")) else None):
        if prefix and any(os.path.exists(f"{prefix}{suffix}") for suffix in (".bin", ".idx")):
            # half of a Megatron store: its .idx is not a file (megatron_prefix would have found it)
            raise DataError(f"token store {spec}: {prefix}.idx {absent(f'{prefix}.idx')} (a Megatron store is "
                            "PREFIX.bin + PREFIX.idx)")
    held = stores_in_folder(spec) if os.path.isdir(spec) else []
    if held:  # the folder a newcomer wrote the stores into (`my/` for `my/tokens`): name what it holds
        shown = ", ".join(held[:5]) + (f", ... ({len(held)} in all)" if len(held) > 5 else "")
        raise DataError(f"token store not found: {spec} is a folder holding token stores ({shown}): name one of "
                        f"them, e.g. {os.path.join(spec, held[0])}")
    bare = spec.rstrip("/")
    if bare != spec and bare and not os.path.isdir(spec) and _opens(bare):  # `data/tokens/` typed for a prefix
        raise DataError(f"token store not found: {spec} is no folder; the token store is {bare} (without the "
                        "trailing /)")
    raise DataError(f"token store not found: {spec} (looked for {spec}.bin + {spec}.idx, {spec}.ds + "
                    f"{spec}.ds.index, a zarr store at {spec} or {spec}.zarr)")


def _opens(spec: str) -> bool:
    """Whether `spec` names a token store (found, whatever its state)."""
    try:
        open_store(spec)
    except DataError as e:
        return not str(e).startswith("token store not found")
    return True


def stores_in_folder(folder: str) -> list[str]:
    """The names (as open_store takes them, relative to `folder`) of the token stores directly in `folder`: Megatron
    prefixes with both files, datatrove `.ds` files with their index, zarr stores (`.zarr` folders), folders of
    preprocess shards, sorted."""
    from .sharded_store import sharded_folder

    names = os.listdir(folder)
    present = set(names)
    held = [n[:-4] for n in names if n.endswith(".idx") and n[:-4] + ".bin" in present]
    held += [n for n in names if n.endswith(".ds") and n + ".index" in present]
    held += [n for n in names if os.path.isdir(os.path.join(folder, n))
             and (n.endswith(".zarr") or sharded_folder(os.path.join(folder, n)) is not None)]
    return sorted(held)
