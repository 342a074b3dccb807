"""`tools/preprocess.py --shard I/N` over large inputs: a file is cut between shards where its format allows (JSON
lines at line starts, compressed ones at blocks of compressed bytes, Parquet at row groups), each shard holding a like
share of the text (bytes weighted by each input's text per byte, compressed or not), and the shards still give the
single run's stream (reference: one `preprocess` over the same inputs); a bad line inside a cut file is reported where
it is. The shards of whole files: tests/test_preprocess_shards.py."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from test_preprocess_shards import WORDS

from nanotronix.data import DataError, open_store



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


def test_compressed_and_plain_inputs_mixed_give_each_shard_a_like_share_of_text(tmp_path, tiny_tokenizer,
                                                                                 preprocess_tool):
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
            assert preprocess_tool.main(common + ["--output-prefix", str(out), "--shard", f"{i}/{count}"]) == 0
        store = open_store(out)
        tokens = np.array([part.num_tokens for part in store.parts], dtype=float)
        assert store.num_documents == 1600
        assert np.abs(tokens / tokens.sum() - 1 / count).max() < 0.25 / count, tokens  # a piece: 1/4 of a share


def test_shards_whose_tasks_counted_a_compressed_file_differently_do_not_open(tmp_path, tiny_tokenizer, preprocess_tool,
                                                                               monkeypatch):
    """The cuts depend on what each task's decompressor makes of a compressed file's first block: a task that found
    another text per byte (another zlib) would cut elsewhere, so its shard does not open with the others'."""
    from nanotronix.data import inputs, pipeline
    files = write_large_inputs(tmp_path / "corpus")
    common = ["--input", str(tmp_path / "corpus"), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded")]
    for i in range(3):
        assert preprocess_tool.main(common + ["--shard", f"{i}/3"]) == 0
    assert open_store(tmp_path / "sharded").num_documents == 601
    found = inputs.text_per_byte
    monkeypatch.setattr(pipeline, "text_per_byte", lambda path: found(path) * (1.01 if path == files[2] else 1))
    assert preprocess_tool.main(common + ["--shard", "1/3", "--overwrite"]) == 0
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
def test_shards_of_large_inputs_read_as_the_single_run(tmp_path, tiny_tokenizer, preprocess_tool, count, monkeypatch):
    from nanotronix.data import compressed_lines
    monkeypatch.setattr(compressed_lines, "COMPRESSED_BLOCK", 128)  # c.jsonl.gz (~2.5 KB) is cut too
    write_large_inputs(tmp_path / "corpus")
    common = ["--input", str(tmp_path / "corpus"), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "2"]
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(count):
        assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "sharded"),
                                              "--shard", f"{i}/{count}"]) == 0
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


def test_a_bad_line_inside_a_cut_file_is_reported_by_byte_offset(tmp_path, tiny_tokenizer, preprocess_tool, capsys):
    corpus = tmp_path / "corpus"
    write_large_inputs(corpus)
    data = (corpus / "a.jsonl").read_bytes()
    bad = data.index(b"\n", len(data) * 3 // 4) + 1  # a line start in the last quarter of the file
    (corpus / "a.jsonl").write_bytes(data[:bad] + b"{not json}\n" + data[bad:])
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded")]
    codes = [preprocess_tool.main(common + ["--shard", f"{i}/8"]) for i in range(8)]
    assert codes.count(2) == 1 and set(codes) == {0, 2}, codes
    assert f"a.jsonl:byte {bad}: invalid JSON" in capsys.readouterr().err


def test_a_bad_line_inside_a_cut_compressed_file_is_reported_by_line(tmp_path, tiny_tokenizer, preprocess_tool, capsys,
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
    codes = [preprocess_tool.main(common + ["--shard", f"{i}/4"]) for i in range(4)]
    assert codes.count(2) == 1 and set(codes) == {0, 2}, codes
    assert "c.jsonl.gz:98: invalid JSON" in capsys.readouterr().err
    parts = [entry["part"] for i in range(4) if codes[i] == 0 for entry in json.loads(
        (tmp_path / "sharded" / f"shard-{i:05d}-of-00004.meta.json").read_text())["inputs"]]
    assert len(parts) >= 3 and all(part.startswith("compressed bytes ") for part in parts), parts
