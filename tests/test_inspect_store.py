"""tools/inspect_store.py: summary, --doc, --json, and --verify catching each kind of damage with one line
(truncated .bin, damaged .idx header, non-contiguous pointers, out-of-vocabulary ids, missing EOS, sidecar
counts), on all three formats and a folder of shards; a document whose index entries leave the stream is refused.
Edits drawn at random: test_store_damage_properties.py. ~3 s (two subprocess runs, the rest in-process)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from nanotronix.data.megatron_store import MegatronWriter
from nanotronix.data.zarr_store import ZarrWriter
from helpers import load_tool
from test_data_support import run_tool

DOCS = [[5, 6, 7, 0], [9, 0], [1, 2, 3, 4, 5, 0]]
SIDECAR = {"tokenizer": {"name": "tiny", "sha256": "ab" * 32, "vocab_size": 400, "eos_id": 0},
           "eos_appended": True, "num_documents": 3, "num_tokens": 12}


@pytest.fixture(scope="module")
def tool():
    return load_tool("inspect_store")


def _write(writer, docs=DOCS, sidecar=SIDECAR):
    writer.add_documents(np.concatenate([np.array(d) for d in docs]), np.array([len(d) for d in docs]))
    writer.finalize(sidecar)


@pytest.fixture
def store(tmp_path):
    _write(MegatronWriter(tmp_path / "s", np.uint16))
    return tmp_path / "s"


def _run(tool, capsys, *args):
    code = tool.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_summary_doc_json_and_verify(tool, capsys, store, tmp_path):
    code, out, _ = _run(tool, capsys, store, "--doc", 2, "--verify")
    assert code == 0
    assert "format            megatron" in out and "documents         3" in out and "tokens            12" in out
    assert "document 2 (6 tokens): 1 2 3 4 5 0" in out and "verify           OK" in out
    code, out, _ = _run(tool, capsys, store, "--json", "--doc", 0)
    report = json.loads(out)
    assert report["doc_tokens"] == DOCS[0] and report["dtype"] == "uint16" and report["vocab_size"] == 400
    _write(ZarrWriter(str(tmp_path / "z.zarr"), np.uint16))
    assert _run(tool, capsys, tmp_path / "z", "--verify")[0] == 0
    ds = tmp_path / "d.ds"
    ds.write_bytes(np.array(sum(DOCS, []), dtype="<u2").tobytes())
    Path(f"{ds}.index").write_bytes(np.cumsum([len(d) for d in DOCS]).astype("<u8").tobytes())
    code, out, _ = _run(tool, capsys, ds, "--verify", "--json")
    assert code == 0 and json.loads(out)["format"] == "datatrove" and json.loads(out)["verified"]


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


DAMAGE = {
    "truncated .bin": (lambda p: Path(f"{p}.bin").write_bytes(Path(f"{p}.bin").read_bytes()[:-3]), "truncated"),
    "magic": (lambda p: _patch(Path(f"{p}.idx"), 0, b"XX"), "damaged header (magic"),
    "version": (lambda p: _patch(Path(f"{p}.idx"), 9, struct.pack("<Q", 2)), "damaged header (version 2"),
    "dtype code": (lambda p: _patch(Path(f"{p}.idx"), 17, b"\x63"), "unknown dtype code 99"),
    "sequence count": (lambda p: _patch(Path(f"{p}.idx"), 18, struct.pack("<Q", 4)), "does not match its header"),
    "short header": (lambda p: Path(f"{p}.idx").write_bytes(b"MMIDIDX"), "damaged header (7 bytes"),
    "pointer": (lambda p: _patch(Path(f"{p}.idx"), 34 + 12 + 8, struct.pack("<q", 6)), "sequence 1 points to byte 6"),
    "token id": (lambda p: _patch(Path(f"{p}.bin"), 2, struct.pack("<H", 401)), "token 1 has id 401, outside"),
    "missing EOS": (lambda p: _patch(Path(f"{p}.bin"), 2 * 5, struct.pack("<H", 7)), "document 1 does not end with"),
    "sidecar count": (lambda p: Path(f"{p}.meta.json").write_text(json.dumps({**SIDECAR, "num_tokens": 13})),
                      "sidecar says num_tokens=13"),
    "sidecar not an object": (lambda p: Path(f"{p}.meta.json").write_text("[1, 2]"), "not a token store's sidecar"),
    "sidecar tokenizer": (lambda p: Path(f"{p}.meta.json").write_text(json.dumps({**SIDECAR, "tokenizer": "abc"})),
                          "not a token store's sidecar"),
    # header 34 bytes, then 3 lengths (int32), 3 pointers (int64), 4 document indices (int64)
    "negative last pointer": (lambda p: _patch(Path(f"{p}.idx"), 34 + 12 + 16, struct.pack("<q", -100)),
                              "damaged index (its last sequence starts at byte -100"),
    "negative last length": (lambda p: _patch(Path(f"{p}.idx"), 34 + 8, struct.pack("<i", -50)), "holds -50 tokens"),
    "sidecar skipped": (lambda p: Path(f"{p}.meta.json").write_text(json.dumps({**SIDECAR, "skipped": 3})),
                        "its skipped is 3, not an object"),
    "sidecar vocab_size": (lambda p: Path(f"{p}.meta.json").write_text(json.dumps(
        {**SIDECAR, "tokenizer": {**SIDECAR["tokenizer"], "vocab_size": "400"}})),
        "its tokenizer's vocab_size is '400', not a whole number"),
    # a vocabulary of 0 holds no id: every token is outside it (was an IndexError's traceback)
    "sidecar vocab_size 0": (lambda p: Path(f"{p}.meta.json").write_text(json.dumps(
        {**SIDECAR, "tokenizer": {**SIDECAR["tokenizer"], "vocab_size": 0}})), "token 0 has id 5, outside"),
    # a count of the wrong type is said as such (was "sidecar says num_tokens=12, the store holds 12")
    "sidecar count type": (lambda p: Path(f"{p}.meta.json").write_text(json.dumps({**SIDECAR, "num_tokens": "12"})),
                           "sidecar says num_tokens='12', the store holds 12"),
    # float values are no token ids: the trainer and evaluate refuse such a store, so --verify does not pass it
    "float values": (lambda p: _write(MegatronWriter(p, np.float32)), "holds float32 values, not integer"),
    # the sidecar's strings and counts of other types (were TypeError tracebacks in the preflight's tokenizer note and
    # a folder of shards' sum of skipped records)
    "sidecar sha256": (lambda p: Path(f"{p}.meta.json").write_text(json.dumps(
        {**SIDECAR, "tokenizer": {**SIDECAR["tokenizer"], "sha256": 5}})), "its tokenizer's sha256 is 5, not a string"),
    "sidecar skipped total": (lambda p: Path(f"{p}.meta.json").write_text(json.dumps({**SIDECAR, "skipped": {
        "total": "3"}})), "its skipped's total is '3', not a whole number"),
    # nested deeper than the JSON reader recurses (was a RecursionError traceback), a folder in its place (was passed
    # over as no sidecar, and the store read without its tokenizer)
    "sidecar nested": (lambda p: Path(f"{p}.meta.json").write_text("[" * 100_000 + "]" * 100_000), "not valid JSON"),
    "sidecar a folder": (lambda p: (Path(f"{p}.meta.json").unlink(), Path(f"{p}.meta.json").mkdir()),
                         "meta.json: is a folder, not a file (the store's sidecar)"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_verify_reports_each_damage_in_one_line(tool, capsys, store, kind):
    damage, message = DAMAGE[kind]
    damage(store)
    code, _, err = _run(tool, capsys, store, "--verify", "--json")
    assert code != 0 and message in err and "\n" not in err, err


def test_document_indices_that_do_not_end_at_the_sequence_count_are_refused_at_open(tool, capsys, store):
    """What Megatron's IndexedDataset asserts when it opens a store (the spec): caught when the store is opened, not
    only by --verify (the loader read documents running into the next ones)."""
    _patch(Path(f"{store}.idx"), 34 + 12 + 24 + 24, struct.pack("<q", 4))  # the last of 4 document indices: 3 -> 4
    code, _, err = _run(tool, capsys, store)
    assert code == 2 and "damaged index (document indices run 0..4, expected 0..3)" in err and "\n" not in err, err


def test_a_document_beyond_a_damaged_index_is_one_line(tool, capsys, store):
    """--doc on a store whose document indices point past its sequences: one line (verify finds it too, first)."""
    _patch(Path(f"{store}.idx"), 34 + 12 + 24 + 16, struct.pack("<q", 7))  # document 2 starts at sequence 7 of 3
    code, _, err = _run(tool, capsys, store, "--doc", "1")
    assert code == 2 and "damaged index (document 1 spans sequences [1, 7) of 3" in err and "\n" not in err, err
    code, _, err = _run(tool, capsys, store, "--doc", "1", "--verify", "--json")  # --json: no progress bar
    assert code == 2 and "document indices decrease" in err and "\n" not in err, err


def test_a_last_sequence_starting_inside_a_token_is_refused_at_open(tool, capsys, store):
    """The stream's length comes from the last sequence (O(1) at open): one starting inside a token was read from
    the token before it, a stream one token short in the trainer and the preflight (only --verify said, of the .bin's
    size)."""
    _patch(Path(f"{store}.idx"), 34 + 12 + 16, struct.pack("<q", 9))  # the last of 3 pointers: 12 -> 9
    code, _, err = _run(tool, capsys, store)
    assert code == 2 and "its last sequence starts at byte 9, inside a 2-byte token" in err and "\n" not in err, err


# A document's sequence edited to leave the stream: it was read as no tokens, as the stream cut where the .bin ends,
# or (negative) as tokens counted from the end of the stream, with exit 0.
SEQUENCE_EDITS = {"pointer past the end": (34 + 12, struct.pack("<q", 10 ** 6)),
                  "negative pointer": (34 + 12, struct.pack("<q", -4)),
                  "pointer inside a token": (34 + 12, struct.pack("<q", 1)),
                  "length past the end": (34, struct.pack("<i", 2 ** 31 - 1)),
                  "negative length": (34, struct.pack("<i", -1))}


@pytest.mark.parametrize("kind", list(SEQUENCE_EDITS))
def test_a_document_whose_sequence_leaves_the_stream_is_one_line(tool, capsys, store, kind):
    _patch(Path(f"{store}.idx"), *SEQUENCE_EDITS[kind])
    code, _, err = _run(tool, capsys, store, "--doc", "0")
    assert code == 2 and "damaged index (document 0's sequences [0, 1) are not whole tokens" in err, err
    assert "\n" not in err


def _zarr_store(tmp_path: Path) -> Path:
    _write(ZarrWriter(str(tmp_path / "z.zarr"), np.uint16))
    return tmp_path / "z.zarr"


def _datatrove_store(tmp_path: Path) -> Path:
    ds = tmp_path / "d.ds"
    ds.write_bytes(np.array(sum(DOCS, []), dtype="<u2").tobytes())
    Path(f"{ds}.index").write_bytes(np.cumsum([len(d) for d in DOCS]).astype("<u8").tobytes())
    Path(f"{ds}.metadata").write_text("tiny|2\n")
    return ds


def _zarr_metadata(store: Path, array: str, **fields) -> None:
    path = store / array / "zarr.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _flip_chunk_byte(store: Path) -> None:
    _patch(store / "document_ends" / "c" / "0", 20, b"\xff")


# damage that zarr meets while reading (was its codec's ValueError / RuntimeError / ZeroDivisionError traceback), a
# document end edited out of order (was read as no tokens, or cut short where the stream ends, with exit 0), a missing
# chunk file (zarr reads it as zeros: --verify passed), a datatrove index or metadata edited (a document past the
# stream read with exit 0; "²", which str.isdigit takes, was a ValueError traceback; a metadata folder was passed over)
OTHER_FORMATS = {
    "zarr chunk bytes": (_zarr_store, _flip_chunk_byte, (), "its document_ends array cannot be read (RuntimeError"),
    "zarr chunk shape 0": (_zarr_store, lambda s: _zarr_metadata(s, "tokens", chunk_grid={
        "name": "regular", "configuration": {"chunk_shape": [0]}}), ("--doc", "0"), "its tokens array cannot be read"),
    "zarr float ends": (_zarr_store, lambda s: _zarr_metadata(s, "document_ends", data_type="float64"), (),
                        "its document_ends array holds float64 values, not integer token offsets"),
    "zarr end out of order": (_zarr_store, lambda s: _zarr_end(s, 0, 100), ("--doc", "0"),
                              "damaged index (document 0 spans tokens [0, 100) of the 12-token stream"),
    "zarr chunk file missing": (_zarr_store, lambda s: (s / "tokens" / "c" / "0").unlink(), ("--verify", "--json"),
                                "its tokens array is missing shard files (0 of its 1 shards"),
    "datatrove end out of order": (_datatrove_store, lambda s: _patch(Path(f"{s}.index"), 8, struct.pack("<Q", 1)),
                                   ("--doc", "1"), "damaged index (document 1 spans tokens [4, 1) of the 12-token"),
    "datatrove metadata a folder": (_datatrove_store, lambda s: (Path(f"{s}.metadata").unlink(),
                                                                 Path(f"{s}.metadata").mkdir()), (),
                                    "d.ds.metadata: is a folder, not a file"),
}


def _zarr_end(store: Path, i: int, value: int) -> None:
    import zarr
    zarr.open_array(str(store / "document_ends"), mode="r+")[i] = value


@pytest.mark.parametrize("kind", list(OTHER_FORMATS))
def test_damaged_zarr_and_datatrove_stores_are_one_line(tool, capsys, tmp_path, kind):
    make, damage, flags, message = OTHER_FORMATS[kind]
    store = make(tmp_path)
    damage(store)
    code, _, err = _run(tool, capsys, store, *flags)
    assert code == 2 and message in err and "\n" not in err, err


def test_a_folder_in_place_of_a_ds_file_of_a_folder_of_them_is_said_so(tool, capsys, tmp_path):
    """A folder of datatrove files is read as one store; a folder named like one of its .ds files was an OSError's
    "Is a directory" (one line, but not saying which store or what is wrong)."""
    (tmp_path / "trove").mkdir()
    _datatrove_store(tmp_path / "trove")  # d.ds and its index, beside the folder e.ds
    (tmp_path / "trove" / "e.ds").mkdir()
    code, _, err = _run(tool, capsys, tmp_path / "trove")
    assert code == 2 and f"{tmp_path / 'trove' / 'e.ds'}: is a folder, not a file (a datatrove .ds file)" in err, err


def test_a_datatrove_token_size_that_int_does_not_read_is_no_token_size(tool, capsys, tmp_path):
    """`tiny|²`: not a `|N` suffix (str.isdigit takes "²", int() does not), so the whole line is the tokenizer's name
    and the token size comes from the file's size, as for a metadata line without one."""
    store = _datatrove_store(tmp_path)
    Path(f"{store}.metadata").write_text("tiny|\u00b2\n")
    code, out, err = _run(tool, capsys, store, "--json", "--doc", "2")
    report = json.loads(out)
    assert code == 0 and report["tokenizer"] == "tiny|\u00b2" and report["doc_tokens"] == DOCS[2], (out, err)


def test_a_shard_copied_over_another_is_refused(tool, capsys, tmp_path):
    """A shard's files copied in under another shard's name (a lost task "repaired" by hand) were read as that shard:
    the same documents twice. Its sidecar still says which shard it is."""
    from nanotronix.data.sharded_store import shard_name

    folder = tmp_path / "corpus"
    for index in range(2):
        _write(MegatronWriter(folder / shard_name(index, 2), np.uint16),
               sidecar={**SIDECAR, "shard": {"index": index, "count": 2, "inputs_sha256": "cd" * 32}})
    for suffix in (".bin", ".idx", ".meta.json"):
        (folder / f"{shard_name(1, 2)}{suffix}").write_bytes((folder / f"{shard_name(0, 2)}{suffix}").read_bytes())
    code, _, err = _run(tool, capsys, folder)
    assert code == 2 and "its sidecar says it is shard 0 of 2, not 1 of 2" in err and "\n" not in err, err


def test_real_process_help_and_failure(store):
    assert run_tool("inspect_store.py", "--help").returncode == 0
    Path(f"{store}.bin").write_bytes(b"\x00")
    res = run_tool("inspect_store.py", str(store), "--verify")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1
