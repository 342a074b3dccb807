"""Input discovery and streaming record reading for preprocessing.

The main process only reads bytes and cuts them into chunks of whole records (bounded size); parsing,
validation and tokenization happen in the workers (`encode.py`), so the reader never becomes the bottleneck
and memory stays bounded whatever the input size. Supported inputs:

- JSON lines: `.jsonl`, `.ndjson`, `.json` (one object per line), optionally compressed `.gz` / `.zst`;
  blank lines are not records and are passed over;
- Parquet (`.parquet`, read in row batches with pyarrow, only the text column);
- plain text (`.txt`, `.md`, `.rst`, `.py`, and other source suffixes below): one file is one document;
- folders of any of these, walked recursively in sorted order (hidden files and folders are ignored).

A record's position is `file:line` (1-based line for JSON lines, row number for Parquet, 1 for text files), or
`file:byte B` for a JSON line of an uncompressed piece that starts inside its file (its line number is unknown
without reading the file up to it).

`preprocess --shard` splits large inputs into pieces (`split_large_inputs`) where the format allows it: an
uncompressed JSON-lines file at any byte (a line belongs to the piece holding its first byte), a Parquet file at
row-group boundaries, a compressed JSON-lines file (`.gz`, `.zst`) at blocks of compressed bytes
(`compressed_lines.py`). Text files (one document each) stay whole. The tasks get like amounts of text, not of
bytes on disk: compressed files count by their estimated text (`text_per_byte`), so that a mix of compressed and
plain inputs still balances.
"""
from __future__ import annotations

import io
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from . import compressed_lines
from .compressed_lines import COMPRESSED_SUFFIXES, CompressedLines, decompress_errors, is_compressed
from .errors import DataError, require_module

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".py", ".pyi", ".tex", ".c", ".h", ".cc",
                 ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs", ".sh", ".html", ".css")


@dataclass(frozen=True)
class MissingColumn:
    """A Parquet row whose file has no text column: its columns, for the --text-key hint."""
    columns: tuple[str, ...]



def input_kind(path: Path) -> Optional[str]:
    name = path.name.lower()
    for comp in ("",) + COMPRESSED_SUFFIXES:
        if any(name.endswith(s + comp) for s in JSONL_SUFFIXES):
            return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def expand_inputs(specs: list[str]) -> list[Path]:
    """Files named on the command line, folders expanded; one clear error for anything unusable."""
    files: list[Path] = []
    for spec in specs:
        if not spec.strip():  # Path("") is the current folder: an unset $INPUT would tokenize wherever it runs
            raise DataError("an input is empty (an unset variable?): name files or folders")
        path = Path(spec).expanduser()
        if path.is_dir():
            visible = [p for p in path.rglob("*")
                       if not any(part.startswith(".") for part in p.relative_to(path).parts)]
            stores = token_store_files(visible)
            found = sorted(p for p in visible if p.is_file() and input_kind(p) and p not in stores)
            if not found:
                raise DataError(f"input folder {spec} holds no supported files (.jsonl[.gz|.zst], .parquet, "
                                f"{', '.join(TEXT_SUFFIXES[:5])}, ...)")
            # what a folder holds that is not read (a .bz2 file, a link to a folder, a broken link): said, since a
            # corpus would otherwise come out smaller without a word; hidden files are passed over quietly
            read = set(found)
            left_out = sorted(p for p in visible if not (p.is_dir() and not p.is_symlink()) and p not in read)
            if left_out:
                names = ", ".join(str(p.relative_to(path)) for p in left_out[:3])
                print(f"note: input folder {spec}: {len(left_out)} entr{'y' if len(left_out) == 1 else 'ies'} not "
                      f"read (not a supported file type, a token store's file, or a link to a folder): {names}"
                      f"{', ...' if len(left_out) > 3 else ''}", file=sys.stderr)
            files.extend(found)
        elif path.is_file():
            if input_kind(path) is None:
                raise DataError(f"input {spec}: unsupported file type (expected .jsonl[.gz|.zst], .parquet or "
                                f"a text file such as .txt/.md/.rst/.py)")
            files.append(path)
        else:
            raise DataError(f"input not found: {spec}")
    seen: dict[tuple[int, int], Path] = {}
    for path in files:  # a folder and a file inside it, overlapping globs, a link (symbolic or hard) to another
        # input: the documents would be stored twice. The file's identity (device, inode) sees through every one.
        info = path.stat()
        first = seen.setdefault((info.st_dev, info.st_ino), path)
        if first is not path:
            also = f" (also as {first})" if str(first) != str(path) else ""
            raise DataError(f"input {path} is named twice{also}: its documents would be stored twice")
    return files


def token_store_files(entries: list[Path]) -> set[Path]:
    """The files among `entries` (what an input folder holds) that belong to token stores written into it
    (`preprocess --output-prefix DATA/tokens` with DATA an input folder): a Megatron store's or shard's sidecar
    `NAME.meta.json` beside its `NAME.idx` or `NAME.bin`, and everything inside a zarr store (a folder with a
    `zarr.json`). Their JSON is no text to tokenize: read as JSON lines, it stopped the next run over the folder (a
    rerun with --overwrite too) at `tokens.meta.json:1: invalid JSON`."""
    present = set(entries)
    zarr_roots = {p.parent for p in entries if p.name == "zarr.json"}
    sidecar = ".meta.json"
    return {p for p in entries
            if (p.name.endswith(sidecar) and any(p.with_name(p.name[:-len(sidecar)] + suffix) in present
                                                 for suffix in (".idx", ".bin")))  # .bin is renamed in first
            or (zarr_roots and any(parent in zarr_roots for parent in p.parents))}


@dataclass(frozen=True)
class InputPiece:
    """What one run reads of an input file: all of it, or (`preprocess --shard`) a byte range [begin, end) of a
    JSON-lines file, meaning the lines that start inside it (compressed: whose first byte comes out of it), or the
    row groups [first, stop) of a Parquet file."""
    path: Path
    nbytes: int  # its share of the file's bytes: what balances shards and drives the progress bar
    byte_range: Optional[tuple[int, int]] = None
    row_groups: Optional[tuple[int, int]] = None

    def part(self) -> Optional[str]:
        """Which part of the file it is (for the sidecar), None for the whole file."""
        if self.byte_range is not None:
            return ("compressed bytes {}-{}" if is_compressed(self.path) else "bytes {}-{}").format(*self.byte_range)
        if self.row_groups is not None:
            return "row groups {}-{}".format(*self.row_groups)
        return None


def whole_files(files: list[Path]) -> list[InputPiece]:
    return [InputPiece(f, f.stat().st_size) for f in files]


def text_per_byte(path: Path) -> float:
    """About how many bytes of text each byte of `path` holds (what `preprocess --shard` balances its tasks by): a
    compressed JSON-lines file's first block of compressed bytes is decompressed to see, a Parquet file's footer
    gives its row groups' sizes before and after compression, any other file is its text. Depends on the file
    alone, so every task of a job array finds the same; a damaged file counts as text (the task that reads it
    reports the damage)."""
    kind = input_kind(path)
    try:
        if kind == "jsonl" and is_compressed(path):
            for _, text, read in compressed_lines.decompressed_blocks(path):
                return max(len(text), 1) / read
        elif kind == "parquet":
            md = _parquet_file(path).metadata
            groups = [md.row_group(g) for g in range(md.num_row_groups)]
            stored = sum(g.column(c).total_compressed_size for g in groups for c in range(md.num_columns))
            if stored > 0:
                return max(sum(g.total_byte_size for g in groups), 1) / stored
    except (DataError, *decompress_errors()):
        return 1.0
    return 1.0  # an empty compressed file, a Parquet file of no row groups, or any other file


def split_large_inputs(files: list[InputPiece], piece_bytes: float,
                       text_ratio: Optional[dict[Path, float]] = None) -> list[InputPiece]:
    """The whole files (`whole_files`) in order, each holding more than `piece_bytes` of text (its size times
    `text_ratio[path]`, `text_per_byte`; 1 when left out) cut into pieces of about that much where its format
    allows (see the module docstring). Depends only on the files' sizes, first blocks and Parquet footers, so every
    task of a job array computes the same pieces."""
    pieces: list[InputPiece] = []
    for whole in files:
        path = whole.path
        size, piece_bytes_here = whole.nbytes, piece_bytes / (text_ratio or {}).get(path, 1.0)  # bytes on disk
        kind = input_kind(path)
        if size <= piece_bytes_here or kind == "text":
            pieces.append(whole)
        elif kind == "jsonl":
            n = math.ceil(size / piece_bytes_here)
            step = compressed_lines.COMPRESSED_BLOCK if is_compressed(path) else 1
            cuts = sorted({size * k // n // step * step for k in range(n)} | {size})
            if len(cuts) == 2:  # too small to cut at blocks
                pieces.append(whole)
            else:
                pieces += [InputPiece(path, b - a, byte_range=(a, b)) for a, b in zip(cuts, cuts[1:])]
        else:
            pieces += _row_group_pieces(path, size, piece_bytes_here)
    return pieces


def _row_group_pieces(path: Path, size: int, piece_bytes: float) -> list[InputPiece]:
    """Consecutive row groups of about piece_bytes (by their compressed size, scaled to the file's)."""
    md = _parquet_file(path).metadata
    groups = [sum(md.row_group(g).column(c).total_compressed_size for c in range(md.num_columns))
              for g in range(md.num_row_groups)]
    if len(groups) < 2:
        return [InputPiece(path, size)]
    scale = size / max(1, sum(groups))
    pieces, first, held = [], 0, 0.0
    for g, nbytes in enumerate(groups):
        held += nbytes * scale
        if held >= piece_bytes or g == len(groups) - 1:
            pieces.append(InputPiece(path, round(held), row_groups=(first, g + 1)))
            first, held = g + 1, 0.0
    return pieces


def _parquet_file(path: Path):
    pq = require_module("pyarrow.parquet", "reading .parquet inputs")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


@dataclass
class Chunk:
    """Whole records, to be parsed and tokenized by a worker. Small text files share a chunk."""
    kind: str  # jsonl | parquet | text
    items: list  # raw lines (bytes), Parquet values, or text files' bytes
    file_index: int  # input piece of the items (of the first item for text chunks)
    first_line: int  # line (JSON lines), row (Parquet) or 1 (text) of items[0]
    # JSON lines: line of each item (blank lines are left out), or its byte offset in the file when the piece
    # starts inside the file (`at_bytes`)
    lines: Optional[list[int]] = None
    files: Optional[list[int]] = None  # text chunks: input piece of each item
    at_bytes: bool = False

    def position(self, k: int) -> tuple[int, int | str]:
        """(piece index, line, row, or "byte B") of item k."""
        if self.files is not None:
            return self.files[k], 1
        if self.lines is None:
            return self.file_index, self.first_line + k
        return self.file_index, f"byte {self.lines[k]}" if self.at_bytes else self.lines[k]


class _CountingReader(io.RawIOBase):
    """Wraps the raw file to report how many (compressed) bytes have been consumed, for the progress bar."""

    def __init__(self, raw):
        self.raw = raw
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.raw.readinto(b)
        self.consumed += n or 0
        return n


class _PlainLines:
    """(line number, or byte offset in a piece that starts inside the file; the line) of an uncompressed JSON-lines
    piece: the lines whose first byte lies in its byte range."""

    def __init__(self, piece: InputPiece):
        self.piece = piece
        self.at_bytes = bool(piece.byte_range and piece.byte_range[0] > 0)
        self.line_no = 0  # of the last line read
        self.counter: Optional[_CountingReader] = None

    def consumed(self) -> int:
        return self.counter.consumed if self.counter else 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        begin, end = self.piece.byte_range or (0, None)
        with open(self.piece.path, "rb", buffering=0) as raw:
            raw.seek(max(begin - 1, 0))
            self.counter = _CountingReader(raw)
            stream = io.BufferedReader(self.counter, 1 << 20)
            pos = begin  # byte offset of the next line
            if begin:  # the rest of the line holding byte begin-1 belongs to the piece before
                pos = begin - 1 + len(stream.readline())
            for self.line_no, line in enumerate(stream, start=1):
                start, pos = pos, pos + len(line)
                if end is not None and start >= end:
                    return
                yield (start if begin else self.line_no), line


def iter_chunks(pieces: list[InputPiece], text_key: str, chunk_bytes: int = 1 << 18,
                on_progress=None) -> Iterator[Chunk]:
    """Chunks of about `chunk_bytes` of input each, in piece order. `on_progress(nbytes)` reports raw bytes."""
    texts, text_files, text_bytes = [], [], 0
    for index, piece in enumerate(pieces):
        path = piece.path
        if _continues(pieces, index):  # read along with the piece before it (_jsonl_chunks)
            continue
        kind = input_kind(path)
        if kind == "text":  # gather consecutive small files: one task per file would cost more than it does
            data = path.read_bytes()
            texts.append(data)
            text_files.append(index)
            text_bytes += len(data)
            if on_progress:
                on_progress(len(data))
            if text_bytes >= chunk_bytes:
                yield Chunk("text", texts, text_files[0], 1, files=text_files)
                texts, text_files, text_bytes = [], [], 0
            continue
        if texts:
            yield Chunk("text", texts, text_files[0], 1, files=text_files)
            texts, text_files, text_bytes = [], [], 0
        if kind == "jsonl":
            run = 1
            while index + run < len(pieces) and _continues(pieces, index + run):
                run += 1
            yield from _jsonl_chunks(index, pieces[index:index + run], chunk_bytes, on_progress)
        else:
            yield from _parquet_chunks(index, piece, text_key, chunk_bytes, on_progress)
    if texts:
        yield Chunk("text", texts, text_files[0], 1, files=text_files)


def _continues(pieces: list[InputPiece], index: int) -> bool:
    """Whether pieces[index] is the next compressed byte range of the file of the piece before it: a file without
    random access is then decompressed once for both, not once from its start for each."""
    if index == 0:
        return False
    before, piece = pieces[index - 1], pieces[index]
    return (piece.path == before.path and is_compressed(piece.path) and piece.byte_range is not None
            and before.byte_range is not None and before.byte_range[1] == piece.byte_range[0])


def _jsonl_chunks(first_index: int, run: list[InputPiece], chunk_bytes: int, on_progress) -> Iterator[Chunk]:
    """The chunks of a JSON-lines piece, or of a run of consecutive compressed pieces of one file (read in one pass);
    a chunk holds lines of one piece."""
    piece = run[0]
    if is_compressed(piece.path):
        reader = CompressedLines(piece.path, None if piece.byte_range is None else [p.byte_range for p in run])
    else:
        reader = _PlainLines(piece)
    ends = list(itertools.accumulate(p.nbytes for p in run))  # progress: compressed bytes up to each piece's end
    items, lines, size, reported, current = [], [], 0, 0, 0

    def report(done: int) -> None:
        nonlocal reported
        if on_progress and done > reported:
            on_progress(done - reported)
            reported = done

    try:
        for position, line in reader:
            if getattr(reader, "range_index", 0) != current:  # the next piece's lines begin
                if items:
                    yield Chunk("jsonl", items, first_index + current, lines[0], lines, at_bytes=reader.at_bytes)
                    items, lines, size = [], [], 0
                report(ends[reader.range_index - 1])
                current = reader.range_index
            if not line.strip():
                continue
            items.append(line)
            lines.append(position)
            size += len(line)
            if size >= chunk_bytes:
                yield Chunk("jsonl", items, first_index + current, lines[0], lines, at_bytes=reader.at_bytes)
                report(min(reader.consumed(), ends[current]))  # the read-ahead past a piece is not its progress
                items, lines, size = [], [], 0
    except decompress_errors() as e:  # gzip/zstd damage: report where it was reached
        raise DataError(f"{piece.path}:{reader.line_no + 1}: cannot decompress ({type(e).__name__}: {e})") from None
    if items:
        yield Chunk("jsonl", items, first_index + current, lines[0], lines, at_bytes=reader.at_bytes)
    report(ends[-1])


def _parquet_chunks(index: int, piece: InputPiece, text_key: str, chunk_bytes: int, on_progress) -> Iterator[Chunk]:
    pf = _parquet_file(piece.path)
    md = pf.metadata
    first, stop = piece.row_groups or (0, md.num_row_groups)
    total_rows = sum(md.row_group(g).num_rows for g in range(first, stop))
    size = piece.nbytes
    rows_per_batch = max(1, min(65536, chunk_bytes // max(1, size // max(1, total_rows))))
    row = 1 + sum(md.row_group(g).num_rows for g in range(first))  # of the file
    if text_key not in pf.schema_arrow.names:
        missing = MissingColumn(tuple(pf.schema_arrow.names))
        for lo in range(0, total_rows, rows_per_batch):
            n = min(rows_per_batch, total_rows - lo)
            yield Chunk("parquet", [missing] * n, index, row)
            row += n
        if on_progress:
            on_progress(size)
        return
    done, read = 0, 0
    groups = None if piece.row_groups is None else list(range(first, stop))
    batches = pf.iter_batches(batch_size=rows_per_batch, row_groups=groups, columns=[text_key])
    while True:
        try:  # a damaged page is found only here, as pyarrow's words alone ("Corrupt snappy compressed data")
            batch = next(batches)
        except StopIteration:
            break
        except Exception as e:  # ArrowInvalid, OSError and friends
            raise DataError(f"{piece.path}:{row}: cannot read the Parquet rows from here ({e})") from None
        values = batch.column(0).to_pylist()
        yield Chunk("parquet", values, index, row)
        row += len(values)
        read += len(values)
        if on_progress and total_rows:
            step = size * read // total_rows - done
            on_progress(step)
            done += step
    if on_progress:
        on_progress(size - done)
