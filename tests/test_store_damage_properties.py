"""Property-based tests (hypothesis, configured in tests/properties.py) of what every reader of a token store does with
a damaged or hand-edited one (README, Data; DESIGN.md): each command, called in this process on a copy of a real store
whose files were edited, returns 0 with what a plain reader of the edited bytes reads, or ends with ONE `error: ...`
line (exit 2) naming the store; never a traceback, a hang, a read of tokens from outside what the index describes,
or a file written beside the store.

The stores, written once by the project's writers (datatrove `.ds` files by the format's facts: the project reads
the format, it writes none): Megatron `.bin/.idx` with its sidecar, zarr, datatrove `.ds` + `.ds.index` +
`.ds.metadata`, a folder of two such `.ds` files, a folder of two preprocess shards. The edits, drawn from the real
files: any file truncated, extended, overwritten in places, emptied, deleted or replaced by a folder; the `.idx`
header's fields (magic, version, dtype code, sequence and document counts) and its arrays' entries (lengths,
pointers, document indices: neighbours, zero, negative as read, past the end, huge); a token id changed (past the
vocabulary too); a zarr array's zarr.json (shape, chunk shape, data type, fill value) or the group's attributes; a
`.ds.index` entry or the `.ds.metadata` line (of either file of the folder); a shard deleted, copied over another,
added past N or rewritten in another dtype; the sidecar's JSON edited (keys deleted, values of other types) or
damaged (tests/properties.py's damaged_json). The readers:
tools/inspect_store.py (plain, --verify, --json, --doc N), `python -m nanotronix.preflight` and the trainer
(`python -m nanotronix.train`, world size 1, 2 steps) with a tiny config naming the store, `python -m
nanotronix.evaluate` (a tiny trained checkpoint scoring the store's windows), tools/plan.py.

What must be refused, from the plain readings below (`Plain`): what cannot be opened as the format says (`at_open`:
every reader); a document whose span leaves the stream (`--doc N`); any broken invariant (`--verify`); float values
and a sidecar vocabulary over the model's (the trainer, preflight, evaluate); ids outside the model's vocabulary in
the windows read (the trainer, evaluate). A store that the plain reader finds whole (every invariant, the sidecar as
written) must work in every reader. Not caught by the readers that open a store in O(1) (only by --verify): pointers
and lengths before the last sequence, a .bin or .ds longer than its index says, a zarr chunk file missing (zarr
reads it as its fill value). `--hypothesis-show-statistics` shows the outcomes. ~20 s on one core."""
from __future__ import annotations

import copy
import json
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from helpers import SPEC_DTYPES, TINY_MODEL, load_tool, tiny_config
from properties import PROPERTY, damaged_json
from test_checkpoint_manifest_properties import OTHER_VALUES, at, places
from test_cli_properties import call_and_check

VOCAB = TINY_MODEL["vocab_size"]  # the sidecars' and the model's
EOS = 0
# 33 tokens: 8 windows of 4 (+1) tokens, all of which the trainer's 2 steps of 4 sequences read (one epoch)
DOCUMENTS = [[17, 3, 250, 9, EOS], [1, 2, 3, 4, 5, 6, EOS], [200, 201, 7, EOS], [8, 8, 8, 8, 8, EOS], [99, 42, EOS],
             [5, 4, 3, 2, 1, 11, 12, EOS]]
SEQ_LEN, GLOBAL_BATCH, STEPS = 4, 4, 2
STORES = {"megatron": "tokens", "zarr": "tokens.zarr", "datatrove": "tokens.ds", "datatrove_folder": "trove",
          "shards": "corpus"}
HALVES = (DOCUMENTS[:3], DOCUMENTS[3:])  # the documents of the two shards, and of the two .ds files of a folder
TIMEOUT_S = 60  # a call that takes longer hangs (the whole file runs in well under a minute)


def sidecar(fmt: str, docs: list[list[int]], shard: Optional[dict] = None) -> dict:
    """What tools/preprocess.py writes beside a store (pipeline.py), for these documents."""
    return {"format": fmt, "created_by": "nanotronix tools/preprocess.py",
            "tokenizer": {"name": "tiny", "sha256": "ab" * 32, "vocab_size": VOCAB, "eos_id": EOS,
                          "eos_token": "<|endoftext|>"},
            "dtype": "uint16", "eos_appended": True, "num_documents": len(docs),
            "num_tokens": sum(map(len, docs)), "text_key": "text", "inputs": [],
            "skipped": {"total": 0, "reasons": {}, "examples": []}, "shuffled": None, "shard": shard}


def write_store(writer, fmt: str, docs: list[list[int]], shard: Optional[dict] = None) -> None:
    writer.add_documents(np.concatenate([np.array(d) for d in docs]), np.array([len(d) for d in docs]))
    writer.finalize(sidecar(fmt, docs, shard))


def write_shard(folder: Path, index: int, docs: list[list[int]], dtype=np.uint16) -> None:
    from nanotronix.data.megatron_store import MegatronWriter
    from nanotronix.data.sharded_store import shard_name

    write_store(MegatronWriter(folder / shard_name(index, 2), dtype), "megatron", docs,
                {"index": index, "count": 2, "inputs_sha256": "cd" * 32})


def datatrove_metadata(docs: list[list[int]]) -> str:
    return f"tiny|2\n{sum(map(len, docs))}\n{sum(map(len, docs))}\n"


def write_datatrove(ds: Path, docs: list[list[int]]) -> None:
    """datatrove's DocumentTokenizer's three files (datatrove_store.py's format facts)."""
    ds.write_bytes(np.array(sum(docs, []), dtype="<u2").tobytes())
    Path(f"{ds}.index").write_bytes(np.cumsum([len(d) for d in docs]).astype("<u8").tobytes())
    Path(f"{ds}.metadata").write_text(datatrove_metadata(docs))


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    """One folder per format holding its store (STORES names it in there)."""
    from nanotronix.data.megatron_store import MegatronWriter
    from nanotronix.data.zarr_store import ZarrWriter

    root = tmp_path_factory.mktemp("stores")
    for fmt in STORES:
        (root / fmt).mkdir()
    write_store(MegatronWriter(root / "megatron" / "tokens", np.uint16), "megatron", DOCUMENTS)
    write_store(ZarrWriter(str(root / "zarr" / "tokens.zarr"), np.uint16), "zarr", DOCUMENTS)
    write_datatrove(root / "datatrove" / "tokens.ds", DOCUMENTS)
    (root / "datatrove_folder" / "trove").mkdir()
    for index, docs in enumerate(HALVES):  # a folder of a job's files, one stream in sorted order
        write_datatrove(root / "datatrove_folder" / "trove" / f"{index:05d}.ds", docs)
    (root / "shards" / "corpus").mkdir()
    for index, docs in enumerate(HALVES):
        write_shard(root / "shards" / "corpus", index, docs)
    return root


@pytest.fixture(scope="module")
def edits_root(tmp_path_factory, commands_in_process):
    return tmp_path_factory.mktemp("edited")


# --- the edits ----------------------------------------------------------------------------------------------------

def numbers_near(old: int) -> st.SearchStrategy[int]:
    """Another value for an integer field: its neighbours, zero, its sign turned, halved, doubled, the store's sizes,
    huge (written modulo the field's width, so -1 is read back as 2^64 - 1 from an unsigned field)."""
    return st.one_of(st.sampled_from([0, 1, -1, old + 1, old - 1, -old, old // 2, 2 * old, 33, 66, 34, 2 ** 31 - 1,
                                      2 ** 32, 2 ** 62, 2 ** 63 - 1, -(2 ** 63)]), st.integers(-100, 100))


def patch_int(path: Path, offset: int, fmt: str, value: int) -> None:
    """Write `value` into the file as struct format `fmt` (modulo its width) at `offset`."""
    size = struct.calcsize(fmt)
    raw = bytearray(path.read_bytes())
    raw[offset:offset + size] = (value % (1 << 8 * size)).to_bytes(size, "little")
    path.write_bytes(bytes(raw))


def read_int(path: Path, offset: int, fmt: str) -> int:
    return struct.unpack_from(fmt, path.read_bytes(), offset)[0]


def idx_fields(idx: Path) -> list[tuple[int, str, str]]:
    """(offset, struct format, name) of every header field and array entry of a Megatron .idx, from the spec's table
    (the header's counts as written, however they were edited)."""
    raw = idx.read_bytes()
    fields = [(9, "<Q", "version"), (17, "<B", "dtype code"), (18, "<Q", "sequence count"),
              (26, "<Q", "document index length")]
    if len(raw) < 34:
        return [f for f in fields if f[0] + struct.calcsize(f[1]) <= len(raw)]
    n, docs = struct.unpack_from("<QQ", raw, 18)
    n = min(n, len(raw))
    fields += [(34 + 4 * i, "<i", f"length {i}") for i in range(n)]
    fields += [(34 + 4 * n + 8 * i, "<q", f"pointer {i}") for i in range(n)]
    fields += [(34 + 12 * n + 8 * i, "<q", f"document index {i}") for i in range(min(docs, len(raw)))]
    return [f for f in fields if f[0] + struct.calcsize(f[1]) <= len(raw)]


@st.composite
def file_edit(draw, folder: Path) -> str:
    """Any file of the store: truncated, extended, bytes overwritten, emptied, deleted, a folder in its place."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:  # earlier edits deleted or replaced them all (both shards deleted)
        return "no file left to edit"
    path = draw(st.sampled_from(files))
    raw, how = path.read_bytes(), draw(st.sampled_from(["truncate", "extend", "overwrite", "empty", "delete",
                                                         "folder"]))
    if how == "truncate" and raw:
        path.write_bytes(raw[:draw(st.integers(0, len(raw) - 1))])
    elif how == "extend":
        path.write_bytes(raw + draw(st.binary(min_size=1, max_size=24)))
    elif how == "overwrite" and raw:
        at_byte = draw(st.integers(0, len(raw) - 1))
        path.write_bytes(raw[:at_byte] + draw(st.binary(min_size=1, max_size=8)) + raw[at_byte + 8:])
    elif how in ("empty", "delete", "folder"):
        path.unlink()
        if how == "empty":
            path.write_bytes(b"")
        elif how == "folder":
            path.mkdir()
    return f"{how} {path.relative_to(folder)}"


@st.composite
def idx_edit(draw, idx: Path) -> str:
    """A header field or index entry of a Megatron .idx set to another value."""
    fields = idx_fields(idx) if idx.is_file() else []
    if not fields:
        return "no .idx to edit"
    offset, fmt, name = draw(st.sampled_from(fields))
    if name == "dtype code":
        value = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 255]))
    else:
        value = draw(numbers_near(read_int(idx, offset, fmt)))
    if name == "version" and draw(st.booleans()):  # the magic instead
        raw = bytearray(idx.read_bytes())
        raw[0:9] = draw(st.sampled_from([b"MMIDIDX\x00\x01", b"\x00" * 9, b"mmididx\x00\x00"]))
        idx.write_bytes(bytes(raw))
        return f"{idx.name}: magic"
    patch_int(idx, offset, fmt, value)
    return f"{idx.name}: {name} = {value}"


@st.composite
def token_edit(draw, data: Path, itemsize: int) -> str:
    """A token id in a flat token file changed: past the vocabulary, the largest id, zero (EOS), a neighbour."""
    count = data.stat().st_size // itemsize if data.is_file() else 0
    if not count:
        return "no token to edit"
    k = draw(st.integers(0, count - 1))
    value = draw(st.sampled_from([VOCAB, VOCAB - 1, VOCAB + 1, 2 ** (8 * itemsize) - 1, EOS, 7]))
    patch_int(data, k * itemsize, "<H" if itemsize == 2 else "<I", value)
    return f"{data.name}: token {k} = {value}"


@st.composite
def json_edit(draw, path: Path, key: Optional[str] = None) -> str:
    """The JSON file (or its object under `key`: a zarr group's attributes) with entries deleted or given values of
    other types, then perhaps its text damaged."""
    try:
        whole = json.loads(path.read_bytes())
        value = copy.deepcopy(whole[key] if key else whole)
    except (OSError, ValueError, RecursionError, KeyError, TypeError):  # gone, or an earlier edit damaged it
        return f"no JSON in {path.name} to edit"
    done = []
    for _ in range(draw(st.integers(0, 2))):
        everywhere = places(value)
        if not everywhere:
            break
        where = draw(st.sampled_from(everywhere))
        parent = at(value, where[:-1])
        if draw(st.booleans()):
            del parent[where[-1]]
            done.append(f"del {where}")
        else:
            parent[where[-1]] = copy.deepcopy(draw(st.sampled_from(OTHER_VALUES)))
            done.append(f"{where} = {parent[where[-1]]!r}")
    if key:
        whole[key] = value
        data, damage = draw(damaged_json(whole)) if draw(st.integers(0, 3)) == 0 else (json.dumps(whole).encode(),
                                                                                         "none")
    else:
        data, damage = draw(damaged_json(value))
    path.write_bytes(data)
    return f"{path.name}: {done} {damage}"


@st.composite
def zarr_array_edit(draw, store: Path) -> str:
    """A zarr array's metadata (its zarr.json) changed: shape, chunk shape, data type, fill value."""
    array = draw(st.sampled_from(["tokens", "document_ends"]))
    path = store / array / "zarr.json"
    try:
        meta = json.loads(path.read_bytes())
        meta["chunk_grid"]["configuration"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return f"no {array}/zarr.json to edit"
    what = draw(st.sampled_from(["shape", "chunks", "data_type", "fill_value"]))
    if what == "shape":  # document ends: at most 10^4 (a reader's whole pass over 2^31 fill values is not a hang)
        meta["shape"] = [draw(numbers_near(meta["shape"][0]).filter(
            lambda v: abs(v) < (2 ** 40 if array == "tokens" else 10 ** 4)))]
    elif what == "chunks":
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [draw(st.sampled_from([0, 1, 5, 16384, 2 ** 20]))]
    elif what == "data_type":
        meta["data_type"] = draw(st.sampled_from(["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64",
                                                  "float32", "float64", "bool"]))
    else:
        meta["fill_value"] = draw(st.sampled_from([0, 7, VOCAB, 33]))
    path.write_text(json.dumps(meta))
    return f"{array}/zarr.json: {what} = {meta.get(what, meta['chunk_grid'])}"


@st.composite
def zarr_token_edit(draw, store: Path) -> str:
    import zarr

    try:
        tokens = zarr.open_array(str(store / "tokens"), mode="r+")
        k = draw(st.integers(0, max(tokens.shape[0] - 1, 0)))
        value = draw(st.sampled_from([VOCAB, VOCAB - 1, 65535, EOS, 7]))
        tokens[k] = value
    except Exception as e:  # an earlier edit broke it: nothing to change
        return f"tokens not editable ({type(e).__name__})"
    return f"tokens[{k}] = {value}"


@st.composite
def shard_edit(draw, folder: Path) -> str:
    """A shard deleted, another's copied over it, one numbered past N added, one rewritten with int32 tokens."""
    how = draw(st.sampled_from(["delete", "duplicate", "past_n", "int32"]))
    index = draw(st.sampled_from([0, 1]))
    files = sorted(folder.glob(f"shard-0000{index}-of-00002.*"))  # an earlier edit may have made one a folder
    if how in ("delete", "int32"):
        for f in files:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    if how in ("duplicate", "past_n"):
        target = 1 - index if how == "duplicate" else 2
        for f in files:
            copy_to = folder / f.name.replace(f"shard-0000{index}", f"shard-0000{target}")
            if copy_to.is_dir():
                shutil.rmtree(copy_to)
            elif copy_to.exists():
                copy_to.unlink()
            shutil.copytree(f, copy_to) if f.is_dir() else shutil.copy(f, copy_to)
    if how == "int32":
        write_shard(folder, index, HALVES[index], np.int32)
    return f"shard {index}: {how}"


@st.composite
def edited_store(draw, originals: Path, root: Path, fmt: str) -> tuple[Path, list[str]]:
    """A copy of the format's store with one to three edits; (the store's path in it, what was done)."""
    folder = Path(tempfile.mkdtemp(dir=root)) / fmt
    shutil.copytree(originals / fmt, folder)
    store = folder / STORES[fmt]
    done = []
    for _ in range(draw(st.integers(1, 3) if draw(st.integers(0, 3)) else st.just(1))):
        if fmt in ("megatron", "shards"):
            prefix = store / draw(st.sampled_from(["shard-00000-of-00002", "shard-00001-of-00002"])) \
                if fmt == "shards" else store
            kinds = {"file": file_edit(folder), "idx": idx_edit(Path(f"{prefix}.idx")),
                     "token": token_edit(Path(f"{prefix}.bin"), 2), "sidecar": json_edit(Path(f"{prefix}.meta.json"))}
            if fmt == "shards":
                kinds["shard"] = shard_edit(store)
        elif fmt == "zarr":
            kinds = {"file": file_edit(folder), "array": zarr_array_edit(store), "token": zarr_token_edit(store),
                     "attributes": json_edit(store / "zarr.json", "attributes")}
        else:
            ds = store / draw(st.sampled_from(["00000.ds", "00001.ds"])) if fmt == "datatrove_folder" else store
            kinds = {"file": file_edit(folder), "token": token_edit(ds, 2),
                     "index": index_edit(Path(f"{ds}.index")), "metadata": metadata_edit(Path(f"{ds}.metadata"))}
        done.append(draw(kinds[draw(st.sampled_from(sorted(kinds)))]))
    return store, done


@st.composite
def index_edit(draw, index: Path) -> str:
    """A `.ds.index` entry (a uint64 document end) set to another value."""
    count = index.stat().st_size // 8 if index.is_file() else 0
    if not count:
        return "no .ds.index entry"
    k = draw(st.integers(0, count - 1))
    value = draw(numbers_near(read_int(index, 8 * k, "<Q")))
    patch_int(index, 8 * k, "<Q", value)
    return f"{index.name}: end {k} = {value}"


@st.composite
def metadata_edit(draw, metadata: Path) -> str:
    """The `.ds.metadata` line: other token sizes, none, one int() does not read, no name."""
    if metadata.is_dir():
        return "no .ds.metadata to edit"
    line = draw(st.sampled_from(["tiny|4", "tiny|3", "tiny|0", "tiny|", "tiny|\u00b2", "tiny|\u0662", "|2", "tiny",
                                 "tiny|99999999999999999999", ""]))
    metadata.write_text(line + "\n33\n33\n")
    return f"{metadata.name}: {line!r}"


# --- the plain readings -------------------------------------------------------------------------------------------

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


# --- the readers --------------------------------------------------------------------------------------------------

@contextmanager
def time_limit(seconds: int):
    """A call still running after `seconds` hangs: it is interrupted (a TimeoutError, which the check reports)."""
    def interrupt(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def call(main, args: list[str], store: Path, root: Path) -> tuple[int, str]:
    """main(args) through call_and_check (no traceback, the last stderr line `error: ...` when it fails, nothing
    written in the store's folder or its scratch folder), within TIMEOUT_S; (exit code, stdout). A failure is ONE
    `error:` line, naming the store."""
    with time_limit(TIMEOUT_S):
        code, out, err = call_and_check(main, [("text", a) for a in args], {"store": str(store.parent)}, root)
    if code:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, (code, err[-2000:])
        assert store.name in errors[0] or store.name.split(".")[0] in errors[0], errors
    return code, out


def check_refusal(plain: Plain, why: Optional[str], code: int, done: list[str]) -> None:
    """`why`: what the reader must refuse (None: it may work); a whole store must work unless the reader has a `why`
    of its own (a datatrove store, which records no vocabulary, holding an id past the model's)."""
    event(f"exit {code}, {'must be refused: ' + why if why else 'whole' if plain.whole else 'may work'}")
    assert why is None or code == 2, (done, plain, f"must be refused: {why}")
    assert not plain.whole or why or code == 0, (done, plain, "a whole store refused")


def for_training(plain: Plain, windows: Optional[int] = None) -> Optional[str]:
    """What a reader that trains on or scores a store must refuse besides what no reader opens: float values, a
    sidecar vocabulary over the model's, a stream too short for one window (schedule.py), an id outside the model's
    vocabulary in the first `windows` windows it reads (None: none counted)."""
    if plain.at_open:
        return plain.at_open
    if plain.dtype.kind not in "iu":
        return "float values"
    if plain.num_tokens < SEQ_LEN + 1:
        return "no window of seq_len + 1 tokens"
    if type(plain.vocab) is int and plain.vocab > VOCAB:
        return "a sidecar vocabulary over the model's"
    if windows is not None:
        read = plain.stream[:windows * SEQ_LEN + 1].astype(np.int64)  # as signed ids: a negative one is outside
        if len(read) and (read.min() < 0 or read.max() >= VOCAB):
            return "an id outside the model's vocabulary in a window read"
    return None


FORMATS = st.sampled_from(sorted(STORES))


@settings(PROPERTY, max_examples=200)
@given(data=st.data(), fmt=FORMATS, flags=st.sets(st.sampled_from(["--verify", "--json", "--doc"])))
def test_inspect_store(originals, edits_root, data, fmt, flags):
    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain = plain_reading(store, fmt)
    doc = data.draw(st.integers(-1, len(DOCUMENTS) + 1), "doc") if "--doc" in flags else None
    args = [str(store), *sorted(flags - {"--doc"}), *(["--doc", str(doc)] if doc is not None else [])]
    code, out = call(load_tool("inspect_store").main, args, store, edits_root)
    why = plain.at_open or ("--verify" in flags and plain.damage) or None
    if doc is not None and not why and not (0 <= doc < plain.num_documents and plain.documents[doc] is not None):
        why = f"document {doc} is not there to read"
    if doc is not None and not 0 <= doc < len(DOCUMENTS):
        plain.whole = False  # no such document in the store as written either
    check_refusal(plain, why or None, code, done)
    if code == 0 and "--json" in flags:  # what it read is what the plain reader reads
        report = json.loads(out)
        assert (report["documents"], report["tokens"], report["dtype"]) == \
            (plain.num_documents, plain.num_tokens, plain.dtype.name), (done, report, plain)
        if doc is not None:
            assert report["doc_tokens"] == plain.documents[doc].tolist(), (done, report["doc_tokens"])
    shutil.rmtree(store.parent.parent)


def config_for(store: Path, root: Path, **sections) -> Path:
    """A tiny run reading `store` (its folder as data.root), with its own folder for the config and logs."""
    folder = Path(tempfile.mkdtemp(dir=root))
    return tiny_config(folder, store, train={"seq_len": SEQ_LEN, "global_batch_size": GLOBAL_BATCH,
                                             "micro_batch_size": 2, "train_steps": STEPS}, **sections)


@settings(PROPERTY, max_examples=100)
@given(data=st.data(), fmt=FORMATS)
def test_preflight(originals, edits_root, data, fmt):
    """`python -m nanotronix.preflight` opens the store as the trainer does (headers and sizes, no tokens)."""
    from nanotronix.preflight import main

    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain, cfg = plain_reading(store, fmt), config_for(store, edits_root)
    code, _ = call(main, ["--config", str(cfg)], store, edits_root)
    check_refusal(plain, for_training(plain), code, done)
    shutil.rmtree(store.parent.parent)
    shutil.rmtree(cfg.parent)


@settings(PROPERTY, max_examples=30)
@given(data=st.data(), fmt=FORMATS)
def test_train(originals, edits_root, data, fmt):
    """The trainer (world size 1), 2 steps of 4 windows: one epoch of the 33-token store's 8 windows, so every id of
    the stream is read (an edit that lengthens the stream leaves some unread: only its first 8 windows count)."""
    from nanotronix.train.main import main

    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain = plain_reading(store, fmt)
    epoch = max((plain.num_tokens - 1) // SEQ_LEN, 0) if not plain.at_open else 0
    counted = epoch if epoch <= STEPS * GLOBAL_BATCH else None
    cfg = config_for(store, edits_root)
    code, _ = call(main, ["--config", str(cfg)], store, edits_root)
    check_refusal(plain, for_training(plain, counted), code, done)
    if code == 0:  # it trained the run's steps
        steps = [json.loads(line)["step"] for line in (cfg.parent / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1:] == [STEPS], (done, steps)
    shutil.rmtree(store.parent.parent)
    shutil.rmtree(cfg.parent)


@settings(PROPERTY, max_examples=60)
@given(data=st.data(), fmt=FORMATS)
def test_evaluate(trained, originals, edits_root, data, fmt):
    """`python -m nanotronix.evaluate` scores the first 8 windows of 4 tokens (the whole 33-token stream): the stream
    too short for them, or an id outside the model's vocabulary in them, must be refused."""
    from nanotronix.evaluate import main

    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain = plain_reading(store, fmt)
    windows = 8
    code, _ = call(main, ["--checkpoint", str(trained[1] / "ckpt"), "--data", str(store), "--seq-len", str(SEQ_LEN),
                          "--num-samples", str(windows), "--no-progress"], store, edits_root)
    why = for_training(plain, windows)
    if not why and plain.num_tokens < windows * SEQ_LEN + 1:
        why = "too few tokens for the windows"
    check_refusal(plain, why, code, done)
    shutil.rmtree(store.parent.parent)


@settings(PROPERTY, max_examples=60)
@given(data=st.data(), fmt=FORMATS)
def test_plan(originals, edits_root, data, fmt):
    """`tools/plan.py` shows a store it cannot open as such in its data table (exit 0: the plan of the rest stands)."""
    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain, cfg = plain_reading(store, fmt), config_for(store, edits_root)
    code, out = call(load_tool("plan").main, [str(cfg), "--gpus", "1"], store, edits_root)
    event(f"exit {code}, {'cannot be opened' if plain.at_open else 'opens'}")
    assert code == 0 and (not plain.at_open or "store unreadable" in out or "store not found" in out), (done, out)
    shutil.rmtree(store.parent.parent)
    shutil.rmtree(cfg.parent)
