"""What a plain reader of each token store format reads from the bytes of a store that
tests/test_store_damage_properties.py edited (`plain_reading`): whether any reader may open it, the first invariant
it breaks, its documents and token stream, and whether it is whole (every reader must then work). The references are
the formats' own facts (formats/megatron_indexed.md, datatrove's format, zarr itself), not the project's readers."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from helpers import SPEC_DTYPES
from store_edits import DOCUMENTS, EOS, HALVES, datatrove_metadata, sidecar


class Plain:
    """What a plain reader of the format reads from the edited bytes. `at_open`: why no reader may open it (None: it
    opens); `damage`: the first invariant it breaks (--verify's to find); `dtype`, `num_documents`, `num_tokens`;
    `documents[i]`: document i's tokens, None where its span leaves the stream; `stream`: the token stream;
    `whole`: every invariant holds and its sidecar is as written (every reader must work)."""

    def __init__(self, at_open=None, damage=None, dtype=None, documents=(), stream=None, vocab=None, whole=False):
        self.at_open, self.damage, self.dtype, self.vocab = at_open, damage, dtype, vocab
        self.documents, self.stream, self.whole = list(documents), stream, whole and not at_open and not damage

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    @property
    def num_tokens(self) -> int:
        return len(self.stream)

    def __repr__(self) -> str:
        return f"Plain(at_open={self.at_open!r}, damage={self.damage!r}, whole={self.whole})"


def refused(why: str) -> Plain:
    return Plain(at_open=why)


def plain_sidecar(path: Path, written: dict) -> tuple[Optional[str], Optional[dict], bool]:
    """(why it cannot be read, its content, whether it is as written) of a sidecar file, absent or not."""
    if path.is_dir():
        return "sidecar is a folder", None, False
    if not path.exists():
        return None, None, True
    try:
        content = json.loads(path.read_bytes().decode())
    except (ValueError, RecursionError):
        return "sidecar is not JSON", None, False
    if not isinstance(content, dict):
        return "sidecar is not an object", None, False
    return None, content, same_json(content, written)


def same_json(a, b) -> bool:
    """Whether two JSON values are the same as written: Python's == takes 0, 0.0, -0.0 and false for one another (a
    skipped total edited to -0.0 counted as the sidecar as written, which readers refuse)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def field(meta, *keys):
    """meta[keys[0]][keys[1]]..., or None where a level is not an object (a hand-edited sidecar)."""
    for key in keys:
        meta = meta.get(key) if isinstance(meta, dict) else None
    return meta


def invariants(plain: Plain, meta: Optional[dict], eos_appended: bool) -> Optional[str]:
    """The invariants every format shares: integer ids inside the sidecar's vocabulary, each document ending with EOS
    (when the sidecar says EOS was appended), the sidecar's counts."""
    if plain.dtype.kind not in "iu":
        return "float values"
    vocab = field(meta, "tokenizer", "vocab_size")
    stream = plain.stream
    if len(stream) and (stream.min() < 0 or (type(vocab) is int and stream.max() >= vocab)):
        return "an id outside the vocabulary"
    if eos_appended and any(d is None or not len(d) or d[-1] != EOS for d in plain.documents):
        return "a document without EOS"
    for key, actual in (("num_documents", plain.num_documents), ("num_tokens", plain.num_tokens)):
        if isinstance(meta, dict) and key in meta and meta[key] != actual:
            return f"sidecar {key}"
    return None


def plain_megatron(prefix: Path, written: dict) -> Plain:
    """By formats/megatron_indexed.md: the header, the three arrays (and the multimodal trailer) ending the file,
    the document indices running 0..N; each sequence's tokens at its pointer, whole tokens inside the stream, which
    is the .bin up to the last sequence's end."""
    idx, binary = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if not idx.is_file() or not binary.is_file():
        return refused("a file missing")
    raw = idx.read_bytes()
    if len(raw) < 34 or raw[:9] != b"MMIDIDX\x00\x00" or int.from_bytes(raw[9:17], "little") != 1:
        return refused("header")
    if raw[17] not in SPEC_DTYPES:
        return refused("dtype code")
    dtype = np.dtype(SPEC_DTYPES[raw[17]])
    n, doc_count = struct.unpack_from("<QQ", raw, 18)
    base = 34 + 12 * n + 8 * doc_count
    if doc_count < 1 or len(raw) not in (base, base + n):
        return refused("size")
    lengths = np.frombuffer(raw, "<i4", n, 34).astype(np.int64)
    pointers = np.frombuffer(raw, "<i8", n, 34 + 4 * n).astype(object)  # Python ints: no sum wraps
    doc_indices = np.frombuffer(raw, "<i8", doc_count, 34 + 12 * n).tolist()
    if doc_indices[0] != 0 or doc_indices[-1] != n:
        return refused("document indices")
    end = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if n else 0
    data = binary.read_bytes()
    if n and (pointers[-1] < 0 or lengths[-1] < 0 or pointers[-1] % dtype.itemsize):
        return refused("last sequence")
    if len(data) < end:
        return refused(".bin truncated")
    why, meta, as_written = plain_sidecar(Path(f"{prefix}.meta.json"), written)
    if why:
        return refused(why)
    stream = np.frombuffer(data, dtype.newbyteorder("<"), end // dtype.itemsize)

    def sequence(j: int):
        lo, size = int(pointers[j]), int(lengths[j]) * dtype.itemsize
        return stream[lo // dtype.itemsize:(lo + size) // dtype.itemsize] \
            if lo >= 0 and size >= 0 and lo % dtype.itemsize == 0 and lo + size <= end else None

    documents = []
    for k in range(doc_count - 1):
        first, stop = doc_indices[k], doc_indices[k + 1]
        seqs = [sequence(j) for j in range(first, stop)] if 0 <= first <= stop <= n else [None]
        documents.append(None if any(s is None for s in seqs) else
                         np.concatenate(seqs) if seqs else np.zeros(0, dtype))
    plain = Plain(dtype=dtype, documents=documents, stream=stream, whole=as_written)
    expected = np.cumsum(lengths * dtype.itemsize) - lengths * dtype.itemsize
    if (lengths < 0).any() or list(pointers) != expected.tolist():
        plain.damage = "pointers not contiguous"
    elif any(b < a for a, b in zip(doc_indices, doc_indices[1:])):
        plain.damage = "document indices decrease"
    elif len(data) != end:
        plain.damage = ".bin size"
    else:
        plain.damage = invariants(plain, meta, field(meta, "eos_appended") is True)
    plain.vocab = field(meta, "tokenizer", "vocab_size")
    plain.whole = plain.whole and not plain.damage
    return plain


def plain_datatrove(path: Path, written_metadata: str, untold: int = 2) -> Plain:
    """By datatrove's format (datatrove_store.py's docstring): uint64 document ends; the token size from the
    metadata's `|N` or the file's size over the last end, else `untold` (`told`: whether it was one of those);
    document i = tokens [end[i-1], end[i])."""
    index, metadata = Path(f"{path}.index"), Path(f"{path}.metadata")
    if not path.is_file() or not index.is_file() or index.stat().st_size % 8 or metadata.is_dir():
        return refused("a file missing or of a size of no index")
    ends = np.frombuffer(index.read_bytes(), "<u8").astype(object)
    last = int(ends[-1]) if len(ends) else 0
    data = path.read_bytes()
    size = None
    if metadata.is_file():
        first = (metadata.read_text(errors="replace").splitlines() or [""])[0]
        name, _, said = first.rpartition("|")
        size = int(said) if name and said.isascii() and said.isdigit() else None
    told = size is not None or last > 0
    if size is None:
        size = len(data) // last if last and len(data) % last == 0 else untold
    if size not in (2, 4) or len(data) < last * size:
        return refused("token size or truncated")
    stream = np.frombuffer(data, f"<u{size}", last)
    starts = [0] + list(ends[:-1])
    documents = [stream[int(a):int(b)] if 0 <= a <= b <= last else None for a, b in zip(starts, ends)]
    plain = Plain(dtype=np.dtype(f"u{size}"), documents=documents, stream=stream)
    if any(b < a for a, b in zip(starts, ends)):
        plain.damage = "ends go backwards"
    elif len(data) != last * size:
        plain.damage = ".ds size"
    else:
        plain.damage = invariants(plain, None, False)
    plain.whole = not plain.damage and (not metadata.exists() or metadata.read_bytes() == written_metadata.encode())
    plain.told = told
    return plain


def plain_datatrove_folder(folder: Path) -> Plain:
    """Its `.ds` files' plain readings one after another, in sorted order (nanotron's Nanoset); a file that tells no
    token size takes the one the others tell (datatrove's reader has one per folder); one dtype for all."""
    files = sorted(folder.glob("*.ds"))
    if not files or any(not f.is_file() for f in files):
        return refused("no .ds file, or a folder of a .ds file's name")
    written = {f"{index:05d}.ds": datatrove_metadata(docs) for index, docs in enumerate(HALVES)}
    parts = [plain_datatrove(f, written.get(f.name, "")) for f in files]
    if any(p.at_open for p in parts):
        return next(p for p in parts if p.at_open)
    told = {p.dtype.itemsize for p in parts if p.told}
    if len(told) == 1:
        parts = [p if p.told else plain_datatrove(f, written.get(f.name, ""), next(iter(told)))
                 for f, p in zip(files, parts)]
    if any(p.at_open for p in parts) or len({p.dtype for p in parts}) > 1:
        return refused("a part unreadable at its folder's token size, or parts of two token sizes")
    return Plain(dtype=parts[0].dtype, documents=sum((p.documents for p in parts), []),
                 stream=np.concatenate([p.stream for p in parts]),
                 damage=next((p.damage for p in parts if p.damage), None),
                 whole=all(p.whole for p in parts) and [f.name for f in files] == sorted(written))


def plain_zarr(path: Path, written: dict) -> Plain:
    """Read with zarr itself (the library is the reference): the two arrays, integer document ends whose last is the
    tokens array's length; a chunk zarr cannot decode is a read it must refuse; a chunk file missing, damage."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        tokens, ends = group["tokens"], group["document_ends"]
        attrs = group.attrs.asdict()
    except Exception:
        return refused("zarr cannot open it")
    if np.dtype(ends.dtype).kind not in "iu" or ends.ndim != 1 or tokens.ndim != 1:
        return refused("document ends of no offsets")
    try:
        all_ends = np.asarray(ends[:]).astype(object)
    except Exception:
        return refused("document_ends cannot be read")
    last = int(all_ends[-1]) if len(all_ends) else 0
    if tokens.shape[0] != last:
        return refused("tokens array of another length")
    try:
        stream = np.asarray(tokens[:])
    except Exception:  # no document can be read, but the store opens (its tokens are read only when asked for)
        return Plain(dtype=np.dtype(tokens.dtype), documents=[None] * len(all_ends), stream=np.zeros(last, np.int64),
                     damage="tokens cannot be read")
    starts = [0] + list(all_ends[:-1])
    documents = [stream[int(a):int(b)] if 0 <= a <= b <= last else None for a, b in zip(starts, all_ends)]
    plain = Plain(dtype=np.dtype(tokens.dtype), documents=documents, stream=stream, whole=same_json(attrs, written))
    try:
        missing = any(a.nchunks_initialized < a.nchunks for a in (tokens, ends))
    except Exception:  # a chunk shape zarr cannot count with
        missing = True
    if missing:
        plain.damage = "a chunk file missing"
    elif any(b < a for a, b in zip(starts, all_ends)):
        plain.damage = "ends go backwards"
    else:
        plain.damage = invariants(plain, attrs, field(attrs, "eos_appended") is True)
    plain.vocab = field(attrs, "tokenizer", "vocab_size")
    plain.whole = plain.whole and not plain.damage
    return plain


def plain_shards(folder: Path) -> Plain:
    """The folder's two shards' plain readings one after another (sharded_store.py): all N present and none past N,
    of one dtype and tokenizer, each the shard its sidecar says."""
    names = sorted(p.name for p in folder.iterdir())
    if any(name.startswith("shard-00002") for name in names):
        return refused("a shard past N")
    parts = []
    for index, docs in enumerate(HALVES):
        prefix = folder / f"shard-0000{index}-of-00002"
        if not Path(f"{prefix}.idx").exists():
            return refused("a shard missing")
        written = sidecar("megatron", docs, {"index": index, "count": 2, "inputs_sha256": "cd" * 32})
        part = plain_megatron(prefix, written)
        if part.at_open:
            return part
        meta = json.loads(Path(f"{prefix}.meta.json").read_text()) if Path(f"{prefix}.meta.json").is_file() else {}
        shard = field(meta, "shard")
        if isinstance(shard, dict) and "index" in shard and (shard.get("index"), shard.get("count")) != (index, 2):
            return refused("a shard's sidecar names another shard")
        parts.append(part)
    if len({p.dtype for p in parts}) > 1:
        return refused("shards of two dtypes")
    plain = Plain(dtype=parts[0].dtype, documents=sum((p.documents for p in parts), []),
                  stream=np.concatenate([p.stream for p in parts]), damage=next((p.damage for p in parts if p.damage),
                                                                                None),
                  vocab=max((p.vocab for p in parts if type(p.vocab) is int), default=None),
                  whole=all(p.whole for p in parts))
    return plain


def plain_reading(store: Path, fmt: str) -> Plain:
    if fmt == "megatron":
        return plain_megatron(store, sidecar("megatron", DOCUMENTS))
    if fmt == "zarr":
        return plain_zarr(store, {**sidecar("zarr", DOCUMENTS), "format": "zarr"})
    if fmt == "datatrove":
        return plain_datatrove(store, datatrove_metadata(DOCUMENTS))
    if fmt == "datatrove_folder":
        return plain_datatrove_folder(store)
    return plain_shards(store)
