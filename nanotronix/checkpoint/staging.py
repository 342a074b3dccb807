"""Host copies of a rank's checkpoint pieces for an asynchronous save, in buffers kept from one save to the next.

The copy to host memory is what an asynchronous save costs the training (the write then runs beside it), so it is
made as fast as the hardware allows:
  - pieces on a GPU are copied into page-locked (pinned) host memory: a device-to-host copy into pageable memory
    goes through the driver's bounce buffer at a fraction of the bandwidth, and cannot run asynchronously;
  - the copies are issued non_blocking, back to back, and waited for once at the end (one synchronize per device,
    not one per tensor);
  - the buffers are allocated once per key (and shape and dtype) and reused by every later save: pinning host
    memory is slow (the driver maps every page), and a fresh ~1/N of the checkpoint at every save would be paid in
    the pause again and again.
Reusing a buffer is safe only once the previous background write has finished reading it: `Checkpointer.save`
waits for the previous save before it stages the next one. On CPU-only torch there is no pinned allocator (and no
device copy to speed up): the same path runs with plain host buffers, still reused.

The buffers live as long as the `HostStaging` (a run's Checkpointer): about 1/N of the checkpoint per rank
(`state.assign_writers`), pinned on a GPU node.
"""
from __future__ import annotations

import torch

from nanotronix.checkpoint.state import LocalPiece


class HostStaging:
    """Host buffers for the pieces a rank saves, reused across saves (see the module docstring)."""

    def __init__(self):
        self._buffers: dict[str, tuple[torch.Tensor, bool]] = {}  # key -> (host buffer, pinned)

    def stage(self, pieces: dict[str, LocalPiece]) -> dict[str, LocalPiece]:
        """Host copies of `pieces` (in this object's buffers: the copies of the previous call are overwritten), all
        complete on return, so that the training may change the originals at once."""
        staged: dict[str, LocalPiece] = {}
        devices: set[torch.device] = set()
        for key, piece in pieces.items():
            source = piece.tensor
            buffer = self._buffer(key, source)
            buffer.copy_(source, non_blocking=True)
            if source.device.type == "cuda":
                devices.add(source.device)
            staged[key] = LocalPiece(buffer, piece.shard_dim)
        for device in devices:  # the copies were queued on each device's current stream, after the step's kernels
            torch.cuda.current_stream(device).synchronize()
        for key in set(self._buffers) - set(pieces):  # no longer saved by this rank: not kept for nothing
            del self._buffers[key]
        return staged

    def _buffer(self, key: str, source: torch.Tensor) -> torch.Tensor:
        pinned = source.device.type == "cuda"
        buffer, was_pinned = self._buffers.get(key, (None, False))
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype or was_pinned != pinned:
            self._buffers.pop(key, None)  # freed before its replacement is allocated
            buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=pinned)
            self._buffers[key] = (buffer, pinned)
        return buffer

    def release(self) -> None:
        """Free the buffers (the run's last save has been written)."""
        self._buffers.clear()
