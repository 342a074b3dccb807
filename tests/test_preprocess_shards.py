"""`tools/preprocess.py --shard I/N` and the folder of shards it writes, read as one store: the shards' concatenated
stream is byte for byte the single run's (reference: one `preprocess` over the same inputs, and the Megatron files
it writes), in both writable formats; an incomplete folder refuses to open. `--shuffle`: the documents in numpy's
seeded permutation, per shard. Large inputs are cut between shards (JSON lines at line starts, compressed ones at
blocks of compressed bytes, Parquet at row groups) and still give the single run's stream. The Slurm job array that
runs the shards: tests/test_slurm.py. ~15 s."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nanotronix.data import DataError, open_store
from nanotronix.data.megatron_store import MegatronWriter
from nanotronix.data.sharded_store import shard_kinds, shard_name, split_inputs
from helpers import load_tool

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@pytest.fixture(scope="module")
def tool():
    return load_tool("preprocess")


def write_corpus(folder: Path) -> Path:
    """Seven JSON-lines files of very different sizes (3 to 400 documents), in nested folders."""
    rng = np.random.default_rng(0)
    for k, docs in enumerate([40, 3, 400, 25, 150, 8, 90]):
        path = folder / f"part{k % 2}" / f"{k:02d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(1, 60)))}) for _ in range(docs)]
        path.write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("sizes, count", [([5, 1, 400, 25, 150, 8, 90], 3), ([1] * 10, 4), ([100, 1, 1, 1], 4),
                                          ([7, 7, 7], 1), ([3, 9], 2)])
def test_split_is_contiguous_covering_and_balanced(sizes, count):
    runs = [split_inputs(sizes, i, count) for i in range(count)]
    assert runs[0][0] == 0 and runs[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # contiguous, in order
    assert all(stop > start for start, stop in runs)  # none empty
    share = sum(sizes) / count
    for start, stop in runs:  # off the equal share by less than the largest file (unless forced to hold one)
        assert abs(sum(sizes[start:stop]) - share) <= max(sizes) or stop - start == 1


def test_split_refuses_impossible_requests():
    with pytest.raises(DataError, match=r"3 shards but the inputs make 2 piece\(s\)"):
        split_inputs([1, 2], 0, 3)
    with pytest.raises(DataError, match="shard index must be in"):
        split_inputs([1, 2], 2, 2)


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_shards_read_as_the_single_run(tmp_path, tiny_tokenizer, tool, fmt, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--format", fmt]
    assert tool.main(common + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(3):
        assert tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/3"]) == 0
    whole = open_store(tmp_path / ("whole" if fmt == "megatron" else "whole.zarr"))
    sharded = open_store(tmp_path / "sharded")
    assert sharded.format == whole.format and sharded.metadata["shards"] == 3
    assert (sharded.num_documents, sharded.num_tokens) == (whole.num_documents, whole.num_tokens)
    assert sharded.summary()["tokenizer"] == whole.summary()["tokenizer"]
    assert np.array_equal(sharded.tokens(0, sharded.num_tokens), whole.tokens(0, whole.num_tokens))
    assert np.array_equal(sharded.document_lengths(), whole.document_lengths())
    assert np.array_equal(sharded.document_lengths(100, 600), whole.document_lengths(100, 600))
    for i in (0, 42, 300, whole.num_documents - 1):
        assert np.array_equal(sharded.document(i), whole.document(i))
    # windows anywhere, many straddling shard boundaries, in the sampler's batched read
    starts = np.random.default_rng(1).integers(0, whole.num_tokens - 65, 500)
    starts[:3] = [int(sharded.parts[0].num_tokens) - 10, int(sharded.parts[0].num_tokens), 0]
    assert np.array_equal(sharded.windows(starts, 65), whole.windows(starts, 65))
    assert np.array_equal(sharded.gather(starts), whole.gather(starts))
    sharded.verify()
    inspect = load_tool("inspect_store")
    assert inspect.main([str(tmp_path / "sharded"), "--verify"]) == 0
    shown = capsys.readouterr().out
    assert f"documents         {whole.num_documents}\n" in shown and "parts             3\n" in shown, shown
    if fmt == "megatron":  # the shards of a Megatron run hold the single run's .bin bytes, in order
        parts = b"".join((tmp_path / "sharded" / f"shard-{i:05d}-of-00003.bin").read_bytes() for i in range(3))
        assert parts == (tmp_path / "whole.bin").read_bytes()


def test_an_incomplete_folder_does_not_open(tmp_path, tiny_tokenizer, tool, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded")]
    for i in (0, 2):
        assert tool.main(common + ["--shard", f"{i}/3"]) == 0
    with pytest.raises(DataError, match=r"1 of 3 shards missing \(1\): a preprocess task has not finished"):
        open_store(tmp_path / "sharded")
    assert tool.main(common + ["--shard", "1/3"]) == 0
    assert open_store(tmp_path / "sharded").num_documents > 0
    # the whole array resubmitted after one task failed: a finished shard succeeds without work, said; a shard of
    # other settings is not replaced unasked; a shard of another split would leave a folder that never opens
    capsys.readouterr()
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").iterdir()}
    assert tool.main(common + ["--shard", "1/3"]) == 0
    said = capsys.readouterr()
    assert "this shard is already complete (the same inputs, tokenizer and settings): nothing to do" in said.err
    assert said.out.startswith(f"already complete: {tmp_path / 'sharded' / 'shard-00001-of-00003'}: ")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").iterdir()} == written
    assert tool.main(common + ["--shard", "1/3", "--shuffle"]) == 2
    assert "already exists; pass --overwrite (slurm/preprocess.sh: EXTRA_ARGS=--overwrite)" in capsys.readouterr().err
    assert tool.main(common + ["--shard", "3/4"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --output-prefix {tmp_path / 'sharded'}: holds shards of a "
                                               "3-way split; --shard 3/4 --format megatron would mix them in one "
                                               "store (write to another folder, or remove those shards)")
    assert tool.main(common + ["--shard", "1/3", "--format", "zarr"]) == 2  # the folder's parts would mix formats
    assert "holds shards of the megatron format; --shard 1/3 --format zarr would mix them" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").iterdir()} == written
    other = tmp_path / "mixed"
    shutil.copytree(tmp_path / "sharded", other)
    (other / "shard-00000-of-00002.idx").write_bytes((other / "shard-00000-of-00003.idx").read_bytes())
    with pytest.raises(DataError, match="shards of different splits"):
        open_store(other)
    # a file numbered past the split (copied in by hand) would be left out of the dataset: refused, named
    stray = tmp_path / "stray"
    shutil.copytree(tmp_path / "sharded", stray)
    (stray / "shard-00005-of-00003.bin").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=f"^{stray}: shard-00005-of-00003.bin is not one of its 3 shards \\(they are "
                                        r"numbered 0 to 2\): remove or rename it$"):
        open_store(stray)
    (stray / "shard-00005-of-00003.bin").unlink()
    for suffix in (".idx", ".bin"):  # a shard's file that is a folder is that, not "missing"
        part = stray / f"shard-00001-of-00003{suffix}"
        content = part.read_bytes()
        part.unlink()
        part.mkdir()
        with pytest.raises(DataError, match=f"{part}:? is a folder, not a file"):
            open_store(stray)
        part.rmdir()
        part.write_bytes(content)
    assert open_store(stray).num_documents == open_store(tmp_path / "sharded").num_documents
    # one shard in both formats (a zarr shard of the same split copied in by hand): refused naming both, not one read
    # and the other left out without a word
    assert tool.main(common[:-1] + [str(tmp_path / "zarr_shards"), "--shard", "1/3", "--format", "zarr"]) == 0
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "sharded", both)
    shutil.copytree(tmp_path / "zarr_shards" / "shard-00001-of-00003.zarr", both / "shard-00001-of-00003.zarr")
    with pytest.raises(DataError) as said:
        open_store(both)
    assert str(said.value) == (f"{both}: {both / 'shard-00001-of-00003.idx'} and {both / 'shard-00001-of-00003.zarr'}"
                               " are the same shard in two formats (preprocess writes one per folder): remove one")
    for i in (0, 2):  # every shard in both formats (before: the zarr ones read, the others unsaid)
        assert tool.main(common[:-1] + [str(tmp_path / "zarr_shards"), "--shard", f"{i}/3", "--format", "zarr"]) == 0
        name = f"shard-0000{i}-of-00003.zarr"
        shutil.copytree(tmp_path / "zarr_shards" / name, both / name)
    with pytest.raises(DataError, match=f"^{both}: {both / 'shard-00000-of-00003.idx'} and "
                                        f"{both / 'shard-00000-of-00003.zarr'} are the same shard in two formats"):
        open_store(both)
    capsys.readouterr()
    for path in corpus.rglob("*.jsonl"):  # compressed files are cut at 64 KiB blocks: 7 small ones are 7 pieces
        path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    assert tool.main(common + ["--shard", "0/9"]) == 2
    assert "9 shards but the inputs make 7 piece(s)" in capsys.readouterr().err


def test_a_complete_shard_with_an_edited_sidecar_reports_the_counts_it_holds(tmp_path, tiny_tokenizer, tool, capsys):
    """A rerun task finds its shard complete by the sidecar's split, inputs and settings, and reports the counts the
    store holds: counts edited by hand in the sidecar were read as they were (int("x"): a ValueError traceback)."""
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded"), "--shard", "0/2"]
    assert tool.main(common) == 0
    prefix = tmp_path / "sharded" / shard_name(0, 2)
    store = open_store(prefix)
    sidecar = Path(f"{prefix}.meta.json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "num_documents": "x", "num_tokens": None,
                                   "skipped": {"total": 0, "reasons": [1]}}))
    capsys.readouterr()
    assert tool.main(common) == 0
    said = capsys.readouterr()
    assert "this shard is already complete" in said.err
    assert said.out.startswith(f"already complete: {prefix}: {store.num_documents} documents, {store.num_tokens} "
                               "tokens; skipped "), said.out


def test_a_split_into_more_than_99999_shards_is_seen(tmp_path):
    """--shard I/N takes any N; past 99999 a shard's name has more than five digits (shard-00000-of-100000), which the
    folder once did not recognise as a shard: a folder of them was no store at all, and a task of another split
    was not refused."""
    writer = MegatronWriter(tmp_path / "sharded" / shard_name(0, 100_000), np.uint16)
    writer.add_document(np.array([1, 2, 3]))
    writer.finalize()
    assert shard_kinds(tmp_path / "sharded") == {(100_000, "megatron")}
    with pytest.raises(DataError, match=r"99999 of 100000 shards missing \(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, \.\.\.\)"):
        open_store(tmp_path / "sharded")
    (tmp_path / "sharded" / "shard-100000-of-100000.bin").write_bytes(b"")  # numbered past the split
    with pytest.raises(DataError, match="shard-100000-of-100000.bin is not one of its 100000 shards"):
        open_store(tmp_path / "sharded")


def test_a_shard_name_in_digits_of_another_script_is_no_shard(tmp_path):
    """Shard names are ASCII digits (shard_name); the folder's patterns were `\\d`, which takes any script's decimal
    digits, and int() reads them: a copy named shard-00000-of-00001 in Arabic-Indic digits counted as shard 0 of 1
    (the folder then held "the same shard in two formats"), and so did a name ending in a line break (`$`, not
    `\\Z`). Such a name is no shard, as a step_\u0663 folder is no step: the folder opens as its real shards."""
    folder = tmp_path / "sharded"
    writer = MegatronWriter(folder / shard_name(0, 1), np.uint16)
    writer.add_document(np.array([1, 2, 3]))
    writer.finalize()
    arabic = shard_name(0, 1).translate({ord(d): chr(0x0660 + int(d)) for d in "0123456789"})
    for suffix in (".bin", ".idx"):
        shutil.copy(folder / f"{shard_name(0, 1)}{suffix}", folder / f"{arabic}{suffix}")
    shutil.copy(folder / f"{shard_name(0, 1)}.idx", folder / f"{shard_name(0, 1)}.idx\n")  # a line break: no shard
    assert shard_kinds(folder) == {(1, "megatron")}
    assert open_store(folder).num_documents == 1
    (folder / f"{shard_name(0, 1)}.bin").unlink()
    (folder / f"{shard_name(0, 1)}.idx").unlink()
    assert shard_kinds(folder) == set()


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_shards_cut_from_different_input_listings_do_not_open(tmp_path, tiny_tokenizer, tool, fmt):
    """A file that grows while the array runs moves the cuts: a shard rerun afterwards would overlap its
    neighbours or leave a gap, so the folder refuses to open rather than read as a dataset."""
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--format", fmt,
              "--output-prefix", str(tmp_path / "sharded")]
    for i in range(3):
        assert tool.main(common + ["--shard", f"{i}/3"]) == 0
    store = open_store(tmp_path / "sharded")
    shards = [part.metadata["shard"] for part in store.parts]
    assert [(s["index"], s["count"]) for s in shards] == [(0, 3), (1, 3), (2, 3)]
    assert len({s["inputs_sha256"] for s in shards}) == 1
    with open(corpus / "part0" / "00.jsonl", "a") as f:
        f.write(json.dumps({"text": "alpha beta"}) + "\n")
    assert tool.main(common + ["--shard", "1/3"]) == 2  # a shard already written is not replaced unasked
    assert tool.main(common + ["--shard", "1/3", "--overwrite"]) == 0
    with pytest.raises(DataError, match="its shards were cut from different input listings"):
        open_store(tmp_path / "sharded")


def write_large_inputs(folder: Path) -> list[Path]:
    """One large JSON-lines file (with blank lines and an unterminated last line), a Parquet file of 9 row groups, a
    gzipped JSON-lines file of two members and a text file: what a corpus of few, big files looks like."""
    rng = np.random.default_rng(3)
    folder.mkdir()
    texts = [" ".join(rng.choice(WORDS, rng.integers(1, 80))) for _ in range(600)]
    lines = [json.dumps({"text": t}) for t in texts[:300]]
    for k in (5, 77, 78, 250):
        lines[k] += "\n"  # a blank line after these
    (folder / "a.jsonl").write_text("\n".join(lines))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts[300:480]}), folder / "b.parquet", row_group_size=20)
    gz = [gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in part).encode())
          for part in (texts[480:530], texts[530:])]
    (folder / "c.jsonl.gz").write_bytes(b"".join(gz))
    (folder / "d.txt").write_text(texts[0])
    return sorted(folder.iterdir())


def test_large_inputs_are_cut_where_their_format_allows(tmp_path, monkeypatch):
    from nanotronix.data import compressed_lines
    from nanotronix.data.inputs import split_large_inputs, whole_files
    files = write_large_inputs(tmp_path / "corpus")
    pieces = split_large_inputs(whole_files(files), piece_bytes=2000)
    by_file = {f.name: [p for p in pieces if p.path == f] for f in files}
    size = files[0].stat().st_size
    ranges = [p.byte_range for p in by_file["a.jsonl"]]
    assert len(ranges) == -(-size // 2000) and ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous byte ranges covering the file
    groups = [p.row_groups for p in by_file["b.parquet"]]
    assert groups[0][0] == 0 and groups[-1][1] == 9 and all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    assert len(groups) > 1
    assert sum(p.nbytes for p in by_file["b.parquet"]) == pytest.approx(files[1].stat().st_size, abs=9)
    # c.jsonl.gz is smaller than a block of compressed bytes (64 KiB): whole; a text file is one document: whole
    assert [(p.byte_range, p.row_groups) for f in ("c.jsonl.gz", "d.txt") for p in by_file[f]] == [(None, None)] * 2
    assert pieces == [p for f in files for p in by_file[f.name]]  # in file order
    monkeypatch.setattr(compressed_lines, "COMPRESSED_BLOCK", 256)
    size = files[2].stat().st_size
    ranges = [p.byte_range for p in split_large_inputs(whole_files(files[2:3]), piece_bytes=1000)]
    assert len(ranges) > 1 and ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] and b[0] % 256 == 0 for a, b in zip(ranges, ranges[1:]))  # cut at blocks only


def test_text_per_byte_reads_the_first_block_or_the_footer(tmp_path):
    """A compressed file small enough for one block holds exactly its text per byte; a Parquet file what its
    footer says its row groups hold before and after compression; plain files, and damaged ones, 1."""
    from nanotronix.data.inputs import text_per_byte
    files = write_large_inputs(tmp_path / "corpus")
    gz = files[2]
    with gzip.open(gz, "rb") as f:
        text = len(f.read())
    assert text_per_byte(gz) == pytest.approx(text / gz.stat().st_size) and text_per_byte(gz) > 2
    import pyarrow.parquet as pq
    md = pq.ParquetFile(files[1]).metadata
    before = sum(md.row_group(g).total_byte_size for g in range(md.num_row_groups))
    after = sum(md.row_group(g).column(0).total_compressed_size for g in range(md.num_row_groups))
    assert text_per_byte(files[1]) == pytest.approx(before / after) and before != after
    assert text_per_byte(files[0]) == text_per_byte(files[3]) == 1.0
    damaged = tmp_path / "damaged.jsonl.gz"
    damaged.write_bytes(b"not gzip at all" * 10)
    assert text_per_byte(damaged) == 1.0


def test_compressed_and_plain_inputs_mixed_give_each_shard_a_like_share_of_text(tmp_path, tiny_tokenizer, tool):
    """Half the documents in one plain JSON-lines file, half in eight gzipped ones (~5x smaller on disk): balanced by
    bytes on disk, the shards holding the gzipped files would get most of the text; by text, each of 2 or 4 shards
    holds its share of the tokens, within a piece's worth."""
    rng = np.random.default_rng(5)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [" ".join(rng.choice(WORDS, rng.integers(20, 60))) for _ in range(1600)]
    (corpus / "a_plain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:800]))
    for k in range(8):
        part = texts[800 + 100 * k:900 + 100 * k]
        (corpus / f"b{k}.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n"
                                                                      for t in part).encode()))
    gz_bytes = sum(f.stat().st_size for f in corpus.glob("*.gz"))
    assert (corpus / "a_plain.jsonl").stat().st_size > 4 * gz_bytes
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1"]
    for count in (2, 4):
        out = tmp_path / f"sharded{count}"
        for i in range(count):
            assert tool.main(common + ["--output-prefix", str(out), "--shard", f"{i}/{count}"]) == 0
        store = open_store(out)
        tokens = np.array([part.num_tokens for part in store.parts], dtype=float)
        assert store.num_documents == 1600
        assert np.abs(tokens / tokens.sum() - 1 / count).max() < 0.25 / count, tokens  # a piece: 1/4 of a share


def test_shards_whose_tasks_counted_a_compressed_file_differently_do_not_open(tmp_path, tiny_tokenizer, tool,
                                                                               monkeypatch):
    """The cuts depend on what each task's decompressor makes of a compressed file's first block: a task that found
    another text per byte (another zlib) would cut elsewhere, so its shard does not open with the others'."""
    from nanotronix.data import inputs, pipeline
    files = write_large_inputs(tmp_path / "corpus")
    common = ["--input", str(tmp_path / "corpus"), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded")]
    for i in range(3):
        assert tool.main(common + ["--shard", f"{i}/3"]) == 0
    assert open_store(tmp_path / "sharded").num_documents == 601
    found = inputs.text_per_byte
    monkeypatch.setattr(pipeline, "text_per_byte", lambda path: found(path) * (1.01 if path == files[2] else 1))
    assert tool.main(common + ["--shard", "1/3", "--overwrite"]) == 0
    with pytest.raises(DataError, match="cut from different input listings .* compressed files decoded differently"):
        open_store(tmp_path / "sharded")


def compress(data: bytes, how: str, rng) -> bytes:
    """`data` as a .gz or .zst file, in 1-3 gzip members / zstd frames cut at random bytes (zero padding after the
    last gzip member, as some writers leave)."""
    import zstandard
    cuts = sorted(int(c) for c in rng.integers(0, len(data) + 1, int(rng.integers(0, 3))))
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    if how == ".gz":
        return b"".join(gzip.compress(part) for part in parts) + b"\0" * int(rng.integers(0, 3))
    return b"".join(zstandard.ZstdCompressor(level=int(rng.integers(1, 20))).compress(part) for part in parts)


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
@pytest.mark.parametrize("seed", range(6))
def test_json_lines_pieces_hold_every_line_once_in_order(tmp_path, seed, compression, monkeypatch):
    """The byte-range rule on awkward files: lines far longer than a piece, blank and CRLF lines, no final newline,
    pieces of a few bytes; compressed, in several members or frames, cut at blocks of 16 compressed bytes.
    Concatenating what the pieces read gives the file's non-blank lines, each once, in order, each at the byte
    offset (uncompressed pieces inside the file) or line number it says; the pieces of a compressed file, read
    together, are decompressed once and give each piece the lines it gives read alone."""
    from nanotronix.data import compressed_lines
    from nanotronix.data.inputs import iter_chunks, split_large_inputs, whole_files
    monkeypatch.setattr(compressed_lines, "COMPRESSED_BLOCK", 16)
    passes, blocks = [], compressed_lines.decompressed_blocks
    monkeypatch.setattr(compressed_lines, "decompressed_blocks", lambda path: passes.append(path) or blocks(path))
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(int(rng.integers(1, 60))):
        kind = rng.integers(0, 6)
        body = "" if kind == 0 else json.dumps({"text": "x" * int(rng.integers(0, 400 if kind == 1 else 20))})
        lines.append(body + ("\r\n" if kind == 2 else "\n"))
    if rng.integers(0, 2):
        lines[-1] = lines[-1].rstrip("\r\n") or "{}"  # no final newline
    path = tmp_path / f"f.jsonl{compression}"
    data = "".join(lines).encode()
    path.write_bytes(compress(data, compression, rng) if compression else data)
    for piece_bytes in (1, 7, 64, path.stat().st_size // 3 + 1):
        pieces = split_large_inputs(whole_files([path]), piece_bytes)
        if piece_bytes == 1:  # cut at every byte, or every block of 16 compressed bytes
            assert len(pieces) == -(-path.stat().st_size // (16 if compression else 1))
        read, positions, by_piece = [], [], [[] for _ in pieces]
        passes.clear()
        for chunk in iter_chunks(pieces, "text", chunk_bytes=50):
            read += chunk.items
            positions += [chunk.position(k)[1] for k in range(len(chunk.items))]
            by_piece[chunk.file_index] += chunk.items
        expected = [line.encode() for line in lines if line.strip()]
        assert read == expected, (piece_bytes, len(pieces))
        if compression:  # a run of pieces of one compressed file is decompressed once, each line in its own piece
            assert len(passes) == 1, (piece_bytes, len(pieces), len(passes))
            alone = [[item for chunk in iter_chunks([p], "text", chunk_bytes=50) for item in chunk.items]
                     for p in pieces]
            assert by_piece == alone, (piece_bytes, len(pieces))
        for item, where in zip(read, positions):  # byte B (a piece inside an uncompressed file), or the line number
            if isinstance(where, str):
                offset = int(where.split()[1])
                assert data[offset:offset + len(item)] == item
            else:
                assert lines[where - 1].encode() == item


@pytest.mark.parametrize("count", [2, 5, 11])
def test_shards_of_large_inputs_read_as_the_single_run(tmp_path, tiny_tokenizer, tool, count, monkeypatch):
    from nanotronix.data import compressed_lines
    monkeypatch.setattr(compressed_lines, "COMPRESSED_BLOCK", 128)  # c.jsonl.gz (~2.5 KB) is cut too
    write_large_inputs(tmp_path / "corpus")
    common = ["--input", str(tmp_path / "corpus"), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "2"]
    assert tool.main(common + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(count):
        assert tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/{count}"]) == 0
    whole, sharded = open_store(tmp_path / "whole"), open_store(tmp_path / "sharded")
    assert np.array_equal(sharded.tokens(0, sharded.num_tokens), whole.tokens(0, whole.num_tokens))
    assert np.array_equal(sharded.document_lengths(), whole.document_lengths()) and whole.num_documents == 601
    parts = b"".join((tmp_path / "sharded" / f"shard-{i:05d}-of-{count:05d}.bin").read_bytes() for i in range(count))
    assert parts == (tmp_path / "whole.bin").read_bytes()
    # each shard's sidecar says which part of which file it read; the documents add up per file
    inputs = [entry for part in sharded.parts for entry in part.metadata["inputs"]]
    assert any(e.get("part", "").startswith("bytes ") for e in inputs)
    assert any(e.get("part", "").startswith("row groups ") for e in inputs)
    # c.jsonl.gz (3.6 KB; ~5.4 KB of text by what its first 128-byte block gives) holds more than a quarter of a
    # shard's share of the corpus' text (~140 KB) only in 11 shards
    assert any(e.get("part", "").startswith("compressed bytes ") for e in inputs) == (count == 11)
    per_file = {}
    for entry in inputs:
        per_file[Path(entry["path"]).name] = per_file.get(Path(entry["path"]).name, 0) + entry["documents"]
    assert per_file == {"a.jsonl": 300, "b.parquet": 180, "c.jsonl.gz": 120, "d.txt": 1}


def test_a_bad_line_inside_a_cut_file_is_reported_by_byte_offset(tmp_path, tiny_tokenizer, tool, capsys):
    corpus = tmp_path / "corpus"
    write_large_inputs(corpus)
    data = (corpus / "a.jsonl").read_bytes()
    bad = data.index(b"\n", len(data) * 3 // 4) + 1  # a line start in the last quarter of the file
    (corpus / "a.jsonl").write_bytes(data[:bad] + b"{not json}\n" + data[bad:])
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded")]
    codes = [tool.main(common + ["--shard", f"{i}/8"]) for i in range(8)]
    assert codes.count(2) == 1 and set(codes) == {0, 2}, codes
    assert f"a.jsonl:byte {bad}: invalid JSON" in capsys.readouterr().err


def test_a_bad_line_inside_a_cut_compressed_file_is_reported_by_line(tmp_path, tiny_tokenizer, tool, capsys,
                                                                      monkeypatch):
    """One gzipped file of two members cut into 4 shards: the shard holding the bad line names its true line
    number; the others read their pieces."""
    from nanotronix.data import compressed_lines
    monkeypatch.setattr(compressed_lines, "COMPRESSED_BLOCK", 128)
    write_large_inputs(tmp_path / "corpus")
    lines = gzip.decompress((tmp_path / "corpus" / "c.jsonl.gz").read_bytes()).splitlines(keepends=True)
    lines.insert(97, b"{not json}\n")  # line 98, in the second gzip member
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(lines[:60])) + gzip.compress(b"".join(lines[60:])))
    common = ["--input", str(path), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded")]
    codes = [tool.main(common + ["--shard", f"{i}/4"]) for i in range(4)]
    assert codes.count(2) == 1 and set(codes) == {0, 2}, codes
    assert "c.jsonl.gz:98: invalid JSON" in capsys.readouterr().err
    parts = [entry["part"] for i in range(4) if codes[i] == 0 for entry in json.loads(
        (tmp_path / "sharded" / f"shard-{i:05d}-of-00004.meta.json").read_text())["inputs"]]
    assert len(parts) >= 3 and all(part.startswith("compressed bytes ") for part in parts), parts


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_shuffle_stores_a_seeded_permutation_of_the_documents(tmp_path, tiny_tokenizer, tool, monkeypatch, fmt):
    from nanotronix.data import shuffle
    monkeypatch.setattr(shuffle, "SHUFFLE_BATCH", 50)  # many batches of the permuted pass
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--format", fmt]
    suffix = ".zarr" if fmt == "zarr" else ""
    assert tool.main(common + ["--output-prefix", str(tmp_path / "plain")]) == 0
    # batches also cut by tokens: the longest document is copied alone, the others gathered several at a time
    longest = int(open_store(tmp_path / ("plain" + suffix)).document_lengths().max())
    monkeypatch.setattr(shuffle, "SHUFFLE_BATCH_TOKENS", longest - 1)
    assert tool.main(common + ["--output-prefix", str(tmp_path / "shuffled"), "--shuffle", "7"]) == 0
    assert tool.main(common + ["--output-prefix", str(tmp_path / "other"), "--shuffle"]) == 0  # seed 1234
    plain, shuffled, other = (open_store(tmp_path / (name + suffix)) for name in ("plain", "shuffled", "other"))
    n = plain.num_documents
    order = np.random.default_rng([7]).permutation(n)  # document j of the output is input document order[j]
    assert [shuffled.document(j).tolist() for j in range(n)] == [plain.document(i).tolist() for i in order]
    assert np.array_equal(shuffled.document_lengths(), plain.document_lengths()[order])
    assert shuffled.metadata["shuffled"] == {"seed": [7]} and plain.metadata["shuffled"] is None
    assert not np.array_equal(other.document_lengths(), shuffled.document_lengths())  # another seed, another order
    shuffled.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temporary file left beside the outputs
        ["corpus"] + [name + ext for name in ("plain", "shuffled", "other")
                      for ext in ([".zarr"] if fmt == "zarr" else [".bin", ".idx", ".meta.json"])])
    # shards: each shuffled on its own, from the seed and its index
    for i in range(2):
        assert tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/2",
                                   "--shuffle", "7"]) == 0
    sharded = open_store(tmp_path / "sharded")
    offset = 0
    for i, part in enumerate(sharded.parts):
        m = part.num_documents
        order = np.random.default_rng([7, i, 2]).permutation(m) + offset
        assert [part.document(j).tolist() for j in range(m)] == [plain.document(k).tolist() for k in order]
        offset += m
    assert offset == n


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_a_shard_whose_part_holds_no_record_is_written_empty(tmp_path, tiny_tokenizer, tool, fmt):
    """One document longer than a shard's share of the text: the second task's byte range holds no line start. It
    writes an empty shard (0 documents), so the folder completes and reads as the single run; before, that task
    failed with 'every input record was empty or bad' on every rerun and the folder could never open."""
    src = tmp_path / "skew.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("x", "y", "z" * 3000)))
    common = ["--input", str(src), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--format", fmt]
    assert tool.main(common + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(2):
        assert tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/2"]) == 0
    whole = open_store(tmp_path / ("whole" if fmt == "megatron" else "whole.zarr"))
    sharded = open_store(tmp_path / "sharded")
    assert [p.num_documents for p in sharded.parts] == [3, 0]
    assert np.array_equal(sharded.tokens(0, sharded.num_tokens), whole.tokens(0, whole.num_tokens))
    sharded.verify()


def test_a_shard_whose_records_were_all_skipped_is_written_empty(tmp_path, tiny_tokenizer, tool):
    """With --skip-bad, a task whose part of the inputs holds only bad records writes an empty shard that counts
    them, so the folder reads as the single run over the same inputs (which skips them too); before, that task
    failed on every rerun and the folder never opened."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jsonl").write_text("".join(json.dumps({"text": f"good document {i}"}) + "\n" for i in range(50)))
    (inputs / "b.jsonl").write_text("".join(json.dumps({"text": "   " * 12}) + "\n" for _ in range(50)))
    common = ["--input", str(inputs), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--skip-bad"]
    assert tool.main(common + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(2):
        assert tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/2"]) == 0
    whole, sharded = open_store(tmp_path / "whole"), open_store(tmp_path / "sharded")
    assert [p.num_documents for p in sharded.parts] == [50, 0]
    assert np.array_equal(sharded.tokens(0, sharded.num_tokens), whole.tokens(0, whole.num_tokens))
    sidecars = sorted((tmp_path / "sharded").glob("*.json"))
    skipped = [json.loads(p.read_text()).get("skipped", {}).get("total") for p in sidecars]
    assert sum(skipped) == 50, skipped  # each task counts the bad records of its own byte range


def test_a_failed_task_of_an_array_leaves_the_shared_output_folder(tmp_path, tiny_tokenizer, tool, capsys):
    """A --shard task of several that fails (a bad record) leaves the --output-prefix folders it made: its sibling
    tasks, started at the same time, write into them, and removing one between a sibling's mkdir and its first file
    would fail that sibling. A single task (--shard 0/1) has no siblings: its failure removes them, as a run's."""
    src = tmp_path / "bad.jsonl"
    src.write_text("".join("{not json}\n" for _ in range(40)))
    common = ["--input", str(src), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1"]
    assert tool.main(common + ["--output-prefix", str(tmp_path / "new" / "sharded"), "--shard", "0/2"]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
    assert (tmp_path / "new" / "sharded").is_dir() and list((tmp_path / "new" / "sharded").iterdir()) == []
    assert tool.main(common + ["--output-prefix", str(tmp_path / "alone" / "sharded"), "--shard", "0/1"]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "alone").exists()
