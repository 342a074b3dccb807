"""The token stores tests/test_store_damage_properties.py edits, written once by the project's writers (datatrove
`.ds` files by the format's facts: the project reads the format, it writes none), and the edits drawn on a copy of
one: any file truncated, extended, overwritten in places, emptied, deleted or replaced by a folder; a Megatron
`.idx`'s header fields and array entries; a token id; a zarr array's zarr.json or the group's attributes; a
`.ds.index` entry or the `.ds.metadata` line; a shard deleted, copied over another, added past N or rewritten in
another dtype; the sidecar's JSON edited or damaged (`edited_store` draws one to three of them)."""
from __future__ import annotations

import copy
import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from hypothesis import strategies as st

from helpers import TINY_MODEL
from properties import damaged_json
from test_checkpoint_manifest_properties import OTHER_VALUES, at, places

VOCAB = TINY_MODEL["vocab_size"]  # the sidecars' and the model's
EOS = 0
# 33 tokens: 8 windows of 4 (+1) tokens, all of which the trainer's 2 steps of 4 sequences read (one epoch)
DOCUMENTS = [[17, 3, 250, 9, EOS], [1, 2, 3, 4, 5, 6, EOS], [200, 201, 7, EOS], [8, 8, 8, 8, 8, EOS], [99, 42, EOS],
             [5, 4, 3, 2, 1, 11, 12, EOS]]
STORES = {"megatron": "tokens", "zarr": "tokens.zarr", "datatrove": "tokens.ds", "datatrove_folder": "trove",
          "shards": "corpus"}
HALVES = (DOCUMENTS[:3], DOCUMENTS[3:])  # the documents of the two shards, and of the two .ds files of a folder


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
