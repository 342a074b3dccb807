"""Reading compressed JSON-lines files (`.gz`, `.zst`) in blocks of compressed bytes, and cutting them there.

`preprocess --shard` cuts a large compressed file between tasks at blocks of COMPRESSED_BLOCK compressed bytes: a
line belongs to the piece holding the block whose decompression gave its first byte. Such a file has no random
access, so a task decompresses the file from its start, counting the lines before its own pieces, then reads its
consecutive pieces in the same pass (decompressing runs at hundreds of MB/s, tokenizing at a few per thread: a late
task's detour is small next to its own work, and the lines keep their true numbers). zlib and zstd hand out all
they can decode of the input so far, so what each block adds is a function of the file, and every task of a job
array (one software environment) attributes each line to the same piece. A whole file is read the same way (one
piece). Any number of gzip members or zstd frames, one after another; a file that ends inside one is reported
(EOFError) rather than read short. Hand-written: gzip.GzipFile and zstandard's readers hide the compressed position
a line came from.
"""
from __future__ import annotations

import bisect
import importlib.util
import math
import zlib
from pathlib import Path
from typing import Iterator, Optional

from .errors import require_module

COMPRESSED_SUFFIXES = (".gz", ".zst")
COMPRESSED_BLOCK = 1 << 16  # compressed JSON lines are read, and cut between shards, in blocks of this many bytes


def is_compressed(path: Path) -> bool:
    return path.name.lower().endswith(COMPRESSED_SUFFIXES)


def decompressed_blocks(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(compressed offset, the bytes its decompression added, compressed bytes read so far) for each
    COMPRESSED_BLOCK of a .gz or .zst file from its start, its gzip members or zstd frames one after another. The
    decompressors hand out all they can decode from the input so far, so what each block adds depends on the file
    alone. EOFError when the file ends inside a member or frame (truncated)."""
    gz = path.name.lower().endswith(".gz")
    if gz:
        def new():
            return zlib.decompressobj(zlib.MAX_WBITS | 16)  # a gzip header and trailer around deflate
    else:
        zstandard = require_module("zstandard", "reading .zst inputs")

        def new():
            return zstandard.ZstdDecompressor().decompressobj()
    stream, inside = new(), False
    with open(path, "rb") as f:
        offset = 0
        while block := f.read(COMPRESSED_BLOCK):
            out, data = [], block
            while data:
                if gz and not inside:
                    data = data.lstrip(b"\0")  # zero padding after a member, which gzip tolerates
                    if not data:
                        break
                inside = True
                out.append(stream.decompress(data))
                data = b""
                if stream.eof:  # this member/frame is complete; whatever follows starts the next one
                    data, stream, inside = stream.unused_data, new(), False
            offset += len(block)
            yield offset - len(block), b"".join(out), offset
    if inside:
        raise EOFError(f"the file ends inside a {'gzip member' if gz else 'zstd frame'} (truncated)")


def decompress_errors() -> tuple:
    """What reading a damaged .gz / .zst file raises (zstandard's own error where it is installed)."""
    errors: tuple = (OSError, EOFError, ValueError, zlib.error)
    if importlib.util.find_spec("zstandard") is not None:
        import zstandard
        errors += (zstandard.ZstdError,)
    return errors


class CompressedLines:
    """(line number, line) of pieces of a compressed JSON-lines file: the lines whose first byte comes out of a block
    of their compressed byte ranges, which follow one another (a task's run of pieces of one file is read in one
    pass, not once per piece); `range_index` says which range the last line belongs to. The blocks before the
    first range are decompressed and only counted."""
    at_bytes = False

    def __init__(self, path: Path, byte_ranges: Optional[list[tuple[int, int]]] = None):
        self.path = path
        self.begins = [0] if byte_ranges is None else [a for a, _ in byte_ranges]  # None: the whole file
        self.end = math.inf if byte_ranges is None else byte_ranges[-1][1]
        self.range_index = 0  # which range the last line yielded belongs to
        self.line_no = 0  # lines of the file completed so far
        self.read = 0  # compressed bytes read

    def consumed(self) -> int:
        """Compressed bytes of the ranges read so far."""
        return max(0, self.read - self.begins[0])

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        begin, end = self.begins[0], self.end
        line: list[bytes] = []  # the piece's line being read, so far
        owner = -1  # block (compressed offset) the line being read began in; -1: between lines
        for offset, data, self.read in decompressed_blocks(self.path):
            if offset < begin:  # every line beginning here is an earlier piece's: count them, keep nothing
                if data:
                    self.line_no += data.count(b"\n")
                    owner = -1 if data.endswith(b"\n") else 0
                continue
            pos = 0
            while pos < len(data):
                if owner < 0:
                    if offset >= end:  # every later line is a later piece's
                        return
                    owner = offset
                newline = data.find(b"\n", pos)
                stop = len(data) if newline < 0 else newline + 1
                ours = begin <= owner < end
                if ours:
                    line.append(data[pos:stop])
                pos = stop
                if newline >= 0:
                    self.line_no += 1
                    if ours:
                        self.range_index = bisect.bisect_right(self.begins, owner) - 1
                        yield self.line_no, b"".join(line)
                        line = []
                    owner = -1
        if line:  # the file's last line, without a final newline
            self.line_no += 1
            self.range_index = bisect.bisect_right(self.begins, owner) - 1
            yield self.line_no, b"".join(line)
