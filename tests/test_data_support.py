"""Shared helpers of the data tests (no tests here): an independent Megatron writer built from the spec table, and a
subprocess runner for the tools (the tiny tokenizer and its corpus: helpers.py)."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SPEC_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                    np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7,
                    np.dtype(np.uint16): 8}


def spec_megatron_bytes(documents: list[list[int]], dtype) -> tuple[bytes, bytes]:
    """(.bin, .idx) bytes written straight from Megatron-LM's format (megatron/core/datasets/indexed_dataset.py), one
    sequence per document: magic, <Q version 1, <B dtype code, <Q N, <Q D+1, int32 lengths, int64 byte
    pointers, int64 document indices 0..N."""
    dtype = np.dtype(dtype)
    n = len(documents)
    binary = b"".join(np.array(d, dtype=dtype).tobytes() for d in documents)
    lengths = [len(d) for d in documents]
    pointers, offset = [], 0
    for length in lengths:
        pointers.append(offset)
        offset += length * dtype.itemsize
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", SPEC_DTYPE_CODES[dtype])
           + struct.pack("<Q", n) + struct.pack("<Q", n + 1)
           + struct.pack(f"<{n}i", *lengths) + struct.pack(f"<{n}q", *pointers)
           + struct.pack(f"<{n + 1}q", *range(n + 1)))
    return binary, idx


def write_spec_megatron(prefix: Path, documents: list[list[int]], dtype) -> None:
    binary, idx = spec_megatron_bytes(documents, dtype)
    Path(f"{prefix}.bin").write_bytes(binary)
    Path(f"{prefix}.idx").write_bytes(idx)


def run_tool(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
