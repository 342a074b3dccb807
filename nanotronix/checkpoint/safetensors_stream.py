"""Write a .safetensors file one tensor at a time.

Hand-written because the `safetensors` library only serialises a complete dict of tensors held in memory
(`save_file`), and the export must convert a 1.7B model in memory bounded by its largest tensor. The format
(https://huggingface.co/docs/safetensors, "Format"): an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with spaces to a multiple
of 8, then the tensors' raw little-endian bytes, back to back in header order. The header can be written first
because every tensor's shape and dtype are known before any data is read; the tests read the output back with
the `safetensors` library itself.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def tensor_nbytes(shape: torch.Size | tuple, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """`plan` is the ordered list of (name, shape, dtype); `write(name, tensor)` must follow that order."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.Size, torch.dtype]], metadata: dict[str, str]):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; this machine is big-endian")
        self.path = path
        self._expected = [(name, tuple(shape), dtype) for name, shape, dtype in plan]
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, shape, dtype in self._expected:
            size = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_shape, want_dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want_name, want_shape, want_dtype):
            raise RuntimeError(f"safetensors writer: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected "
                               f"{want_name} {want_shape} {want_dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            self._file.close()
            raise RuntimeError(f"safetensors writer: {self.path} closed before {missing} was written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
