"""Property-based tests (hypothesis) of how preprocess cuts and reads its inputs, against references written plainly
here: `split_inputs`' cuts (sharded_store.py) against the exactly nearest boundaries (Fractions),
`pipeline._pieces_of_shard` tiling every input file, and compressed JSON lines (compressed_lines.py, inputs.iter_chunks)
against Python's own gzip / zstandard readers, in blocks of a few bytes, several members or frames, cut into pieces.

Derandomized with no example database (tests/properties.py); files go to temporary folders. ~2 s on one core."""
from __future__ import annotations

import gzip
import io
import tempfile
from fractions import Fraction
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanotronix.data import compressed_lines
from nanotronix.data.compressed_lines import CompressedLines
from nanotronix.data.errors import DataError
from nanotronix.data.inputs import InputPiece, iter_chunks
from nanotronix.data.pipeline import _pieces_of_shard
from nanotronix.data.sharded_store import split_inputs
from properties import PROPERTY

# --- shards of the inputs ---------------------------------------------------------------------------------------

def _nearest_boundaries(sizes: list[int], target: Fraction) -> set[int]:
    ends = [0]
    for s in sizes:
        ends.append(ends[-1] + s)
    best = min(abs(e - target) for e in ends)
    return {b for b, e in enumerate(ends) if abs(e - target) == best}


@settings(PROPERTY, max_examples=300)
@given(st.lists(st.one_of(st.just(0), st.integers(0, 12), st.integers(0, 2**40)), min_size=1, max_size=40),
       st.data())
def test_split_inputs_partitions_the_inputs_at_the_boundaries_nearest_equal_shares(sizes, data):
    count = data.draw(st.integers(1, len(sizes) + 2), "count")
    if count > len(sizes):
        for index in range(count):
            with pytest.raises(DataError, match="use fewer shards"):
                split_inputs(sizes, index, count)
        return
    runs = [split_inputs(sizes, index, count) for index in range(count)]
    assert runs[0][0] == 0 and runs[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # no gap, no overlap, in order
    assert all(start < stop for start, stop in runs)  # every shard gets at least one
    total = sum(sizes)
    for k in range(1, count):  # cut k: a boundary nearest to k/count of the text, moved only to keep shards non-empty
        cut, before = runs[k][0], runs[k - 1][0]
        allowed = {min(max(b, before + 1), len(sizes) - (count - k))
                   for b in _nearest_boundaries(sizes, Fraction(total * k, count))}
        assert cut in allowed, (k, cut, allowed)


# Inputs as preprocess lists them (whole files; names only: `_pieces_of_shard` reads no file for JSON lines or text)
input_files = st.lists(st.tuples(st.sampled_from(["jsonl", "jsonl.gz", "txt"]), st.integers(0, 3 << 17),
                                 st.sampled_from([1.0, 2.5, 4.0])), min_size=1, max_size=8)


@settings(PROPERTY, max_examples=150)
@given(input_files, st.integers(1, 12))
def test_pieces_of_shards_tile_every_input_file_once_in_order(files, count):
    pieces = [InputPiece(Path(f"/in/f{i:02d}.{kind}"), size) for i, (kind, size, _) in enumerate(files)]
    ratio = {Path(f"/in/f{i:02d}.{kind}"): r for i, (kind, _, r) in enumerate(files) if kind.endswith(".gz")}
    try:
        shards = [_pieces_of_shard(pieces, index, count, ratio) for index in range(count)]
    except DataError as e:
        assert "use fewer shards" in str(e)
        return
    assert all(shards)
    flat = [p for shard in shards for p in shard]
    share = sum(p.nbytes * ratio.get(p.path, 1.0) for p in pieces) / count
    for whole in pieces:
        mine = [p for p in flat if p.path == whole.path]
        assert flat.index(mine[0]) + len(mine) - 1 == flat.index(mine[-1])  # consecutive
        if len(mine) == 1 and mine[0].byte_range is None:
            assert mine[0].nbytes == whole.nbytes
            continue
        ranges = [p.byte_range for p in mine]
        assert ranges[0][0] == 0 and ranges[-1][1] == whole.nbytes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and all(a < b for a, b in ranges)
        assert all(p.nbytes == b - a for p, (a, b) in zip(mine, ranges))
        block = compressed_lines.COMPRESSED_BLOCK if whole.path.name.endswith(".gz") else 1
        assert all(a % block == 0 for a, _ in ranges)
        piece_bytes = max(share / 4, 1) / ratio.get(whole.path, 1.0)  # bytes on disk
        assert all(b - a <= piece_bytes + block for a, b in ranges)
    assert [p.path for p in flat] == sorted(p.path for p in flat)  # in the inputs' order


# --- compressed JSON lines --------------------------------------------------------------------------------------

# lines of any text but "\n", some ending in "\r" (CRLF files), empty ones, unicode
line_texts = st.lists(st.tuples(st.one_of(st.just(""), st.text(st.characters(blacklist_characters="\n",
                                                                             blacklist_categories=["Cs"]),
                                                                max_size=60)), st.booleans())
                      .map(lambda text_cr: text_cr[0] + "\r" * text_cr[1]), max_size=30)


def _members(raw: bytes, fmt: str, cuts: list[int], padding: int) -> list[tuple[bytes, int]]:
    """`raw` in several gzip members, each followed by `padding` zero bytes (which gzip tolerates), or zstd frames,
    with and without their content size and checksum, each after `padding` skippable frames (as pzstd writes):
    (compressed bytes, length of the text they hold) of each."""
    bounds = [0] + sorted({c % (len(raw) + 1) for c in cuts}) + [len(raw)]
    texts = [raw[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [b""]
    if fmt == "gz":
        return [(gzip.compress(t, mtime=0) + b"\0" * padding, len(t)) for t in texts]
    import zstandard
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    return [member for k, t in enumerate(texts) for member in [(skippable, 0)] * padding + [
        (zstandard.ZstdCompressor(write_content_size=k % 2 == 0, write_checksum=k % 3 == 1).compress(t), len(t))]]


def _compress(raw: bytes, fmt: str, cuts: list[int], padding: int) -> bytes:
    return b"".join(packed for packed, _ in _members(raw, fmt, cuts, padding))


def _fresh_decompressor(fmt: str):
    if fmt == "gz":
        import zlib
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    import zstandard
    return zstandard.ZstdDecompressor().decompressobj()


def _reference_lines(path: Path, fmt: str) -> list[bytes]:
    """Python's own decompression, lines split at b"\\n" only (JSON Lines' separator: a "\\r" before it is JSON
    whitespace; bytes.splitlines would also split at a lone "\\r", which JSON lines may hold between values)."""
    if fmt == "gz":
        with gzip.open(path, "rb") as f:
            return f.readlines()
    import zstandard
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as r:
        return io.BytesIO(r.read()).readlines()


@settings(PROPERTY, max_examples=80)
@given(line_texts, st.booleans(), st.sampled_from(["gz", "zst"]), st.lists(st.integers(0, 10**6), max_size=3),
       st.integers(0, 3), st.integers(1, 64), st.data())
def test_compressed_lines_read_back_exactly_whole_and_in_pieces(lines, final_newline, fmt, cuts, padding, block,
                                                                data):
    raw = "\n".join(lines).encode() + (b"\n" if final_newline and lines else b"")
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(compressed_lines, "COMPRESSED_BLOCK", block):
        path = Path(tmp, f"in.jsonl.{fmt}")
        path.write_bytes(_compress(raw, fmt, cuts, padding))
        expected = _reference_lines(path, fmt)
        assert b"".join(expected) == raw
        whole = list(CompressedLines(path))
        assert [line for _, line in whole] == expected
        assert [n for n, _ in whole] == list(range(1, len(expected) + 1))
        # pieces at block boundaries, each read alone, and a run of them read in one pass
        size = path.stat().st_size
        starts = sorted(set(data.draw(st.lists(st.integers(1, max(1, (size - 1) // block)), max_size=4), "cuts")))
        bounds = [0] + [s * block for s in starts if s * block < size] + [size]
        ranges = list(zip(bounds, bounds[1:]))
        read = [list(CompressedLines(path, [r])) for r in ranges]
        assert [item for piece in read for item in piece] == whole
        first = data.draw(st.integers(0, len(ranges) - 1), "first range of a run")
        run = CompressedLines(path, ranges[first:])
        got = []
        for item in run:
            got.append((run.range_index + first, item))
        assert got == [(k, item) for k, piece in enumerate(read) if k >= first for item in piece]


@settings(PROPERTY, max_examples=60)
@given(line_texts, st.sampled_from(["gz", "zst"]), st.lists(st.integers(0, 10**6), max_size=3), st.integers(0, 3),
       st.integers(1, 48))
def test_a_compressed_line_belongs_to_the_block_that_gave_its_first_byte(lines, fmt, cuts, padding, block):
    """Against fresh decompressors fed the file up to each block boundary, member by member: a line starting at text
    byte s is the piece's whose block first made the decompressed text longer than s."""
    raw = "\n".join(lines).encode() + b"\n"
    members = _members(raw, fmt, cuts, padding)
    packed = b"".join(m for m, _ in members)

    def text_out_of(prefix: int) -> int:  # text bytes decodable from the file's first `prefix` bytes
        done = out = 0
        for member, text_length in members:
            if prefix >= done + len(member):
                out += text_length
            elif prefix > done:
                out += len(_fresh_decompressor(fmt).decompress(member[:prefix - done]))
            done += len(member)
        return out

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(compressed_lines, "COMPRESSED_BLOCK", block):
        path = Path(tmp, f"in.jsonl.{fmt}")
        path.write_bytes(packed)
        blocks = range(0, len(packed), block)
        out_after = [text_out_of(min(b + block, len(packed))) for b in blocks]
        line_starts = np.cumsum([0] + [len(x) for x in io.BytesIO(raw).readlines()])[:-1]
        owner_block = [next(k for k, n in enumerate(out_after) if n > s) for s in line_starts]
        for k, b in enumerate(blocks):
            mine = [no for no, _ in CompressedLines(path, [(b, min(b + block, len(packed)))])]
            assert mine == [i + 1 for i, owner in enumerate(owner_block) if owner == k]


@settings(PROPERTY, max_examples=60)
@given(line_texts, st.sampled_from(["gz", "zst"]), st.lists(st.integers(0, 10**6), max_size=2), st.integers(1, 64),
       st.data())
def test_a_compressed_file_cut_inside_a_member_is_reported_not_read_short(lines, fmt, cuts, block, data):
    raw = "\n".join(lines).encode() + b"\n"
    members = _members(raw, fmt, cuts, 0)
    packed = b"".join(m for m, _ in members)
    ends = set(np.cumsum([len(m) for m, _ in members]).tolist())
    cut = data.draw(st.integers(1, len(packed) - 1).filter(lambda c: c not in ends), "cut")
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(compressed_lines, "COMPRESSED_BLOCK", block):
        path = Path(tmp, f"in.jsonl.{fmt}")
        path.write_bytes(packed[:cut])
        with pytest.raises(compressed_lines.decompress_errors()):
            list(CompressedLines(path))


@settings(PROPERTY, max_examples=60)
@given(line_texts, st.booleans(), st.sampled_from(["", "gz", "zst"]), st.lists(st.integers(0, 10**6), max_size=2),
       st.integers(1, 32), st.lists(st.integers(1, 10**6), max_size=5), st.integers(1, 200), st.data())
def test_pieces_of_a_json_lines_file_hand_out_each_line_once(lines, final_newline, fmt, members, block, cut_seeds,
                                                             chunk_bytes, data):
    """inputs.iter_chunks over a file cut into byte ranges (at blocks where compressed): every non-blank line once,
    in order, in the chunk of the piece holding its first byte (plain: of the file; compressed: of the decompressed
    blocks, as the piece read alone says), at its line number, or its byte offset in a plain piece starting inside
    the file; the progress reported adds up to the pieces' bytes. Also for a run of the pieces (what one shard
    reads), which may start inside the file."""
    raw = "\n".join(lines).encode() + (b"\n" if final_newline and lines else b"")
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(compressed_lines, "COMPRESSED_BLOCK", block):
        path = Path(tmp, "in.jsonl" + (f".{fmt}" if fmt else ""))
        path.write_bytes(_compress(raw, fmt, members, 0) if fmt else raw)
        size, step = path.stat().st_size, block if fmt else 1
        cuts = sorted({c % max(size, 1) // step * step for c in cut_seeds} - {0})
        bounds = [0] + cuts + [size]
        pieces = [InputPiece(path, b - a, byte_range=(a, b) if len(bounds) > 2 else None)
                  for a, b in zip(bounds, bounds[1:])]
        first = data.draw(st.integers(0, len(pieces) - 1), "first piece of the run")
        stop = data.draw(st.integers(first + 1, len(pieces)), "stop piece of the run")
        progress = []
        chunks = list(iter_chunks(pieces[first:stop], "text", chunk_bytes, on_progress=progress.append))
        assert sum(progress) == bounds[stop] - bounds[first]
        got = [(first + c.file_index, c.lines[k], item) for c in chunks for k, item in enumerate(c.items)]
        expected_lines = _reference_lines(path, fmt) if fmt else io.BytesIO(raw).readlines()
        starts = np.cumsum([0] + [len(x) for x in expected_lines]).tolist()
        expected = []
        for number, (start, line) in enumerate(zip(starts, expected_lines), start=1):
            if not line.strip():
                continue
            if fmt:
                piece = next(k for k, (a, b) in enumerate(zip(bounds, bounds[1:]))
                             if number in [n for n, _ in CompressedLines(path, [(a, b)])])
                expected.append((piece, number, line))
            else:
                piece = next(k for k, b in enumerate(bounds[1:]) if start < b)
                expected.append((piece, start if bounds[piece] else number, line))
        assert got == [(piece, position, line) for piece, position, line in expected if first <= piece < stop]
