"""The trainer's batch feed: the configured loader (PyTorch or DALI) with the next step's batch read ahead.

A step's batch is a pure function of the step (loader.py), so the batch of step s+1 can be read while step s
trains without changing what any step sees: prefetching only moves *when* the read happens. The resume state
(consumed samples) advances when a batch is handed to training, never when one is read ahead, so a checkpoint
saved after step s resumes at s+1 exactly as without prefetching. On CUDA the PyTorch loader reads straight into
page-locked (pinned) memory, so the trainer's `to(device, non_blocking=True)` is a true asynchronous copy; DALI
hands over CUDA tensors itself.

Hand-written (one worker thread, one batch ahead) rather than `torch.utils.data.DataLoader`: a step's batch is
one vectorised read of a few milliseconds, for which DataLoader's worker processes (and sending each batch
through shared memory) cost more than they save, and a DALI pipeline must not be forked into them. Every read,
whether ahead or on demand, runs on the same worker thread, so the reader (a DALI pipeline) is only ever used
from one thread.
"""
from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import torch

from .loader import TrainLoader, build_train_loader


class PrefetchingLoader:
    """`batch(step)` like TrainLoader's, with `batch(step + 1)` read in the background meanwhile."""

    def __init__(self, loader: TrainLoader, read_batch: Callable[[int], torch.Tensor], device: torch.device,
                 last_step: Optional[int] = None, close_reader: Optional[Callable[[], None]] = None,
                 name: str = "pytorch", skipped_steps: Sequence[tuple[int, int]] = ()):
        self.loader = loader  # owns the resume state
        self.name = name
        self._skipped_steps = sorted(skipped_steps)  # inclusive ranges never read (train.skip_steps)
        self._read_batch = read_batch
        self._close_reader = close_reader
        self._pin = device.type == "cuda"
        self._last_step = last_step
        init = functools.partial(torch.cuda.set_device, device) if device.type == "cuda" else None
        # torch.cuda.set_device is per thread: the worker must use the trainer's GPU (LOCAL_RANK), not cuda:0.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanotronix-prefetch", initializer=init)
        self._ahead: Optional[tuple[int, Future]] = None

    def _read(self, step: int) -> torch.Tensor:
        batch = self._read_batch(step)
        if self._pin and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch

    def batch(self, step: int) -> torch.Tensor:
        """This rank's share of global step `step`: LongTensor [grad_accum, micro_batch_size, seq_len+1]."""
        if self._ahead is not None and self._ahead[0] == step:
            future = self._ahead[1]
        else:  # first call, or a jump: what was read ahead is not wanted
            self._drop_ahead()
            future = self._worker.submit(self._read, step)
        self._ahead = None
        batch = future.result()  # re-raises a read error here, in the training thread
        following = self._following(step)
        if self._last_step is None or following <= self._last_step:
            self._ahead = (following, self._worker.submit(self._read, following))
        self.loader.mark_consumed(step)
        return batch

    def skip(self, step: int) -> None:
        """Pass over the batch of a skipped step (train.skip_steps): consumed for the resume state, never read."""
        self.loader.mark_consumed(step)

    def _following(self, step: int) -> int:
        """The next step whose batch is read after `step`'s."""
        following = step + 1
        for first, last in self._skipped_steps:
            if first <= following <= last:
                following = last + 1
        return following

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()  # if already running, it finishes first (the worker is serial) and is ignored
            self._ahead = None

    def close(self) -> None:
        """Stop the worker (waiting for a read in progress) and release the reader; idempotent."""
        self._drop_ahead()
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self._close_reader is not None:
            self._close_reader()
            self._close_reader = None

    # ---- TrainLoader's bookkeeping, unchanged -------------------------------------------------------------

    @property
    def next_step(self) -> int:
        return self.loader.next_step

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def stats(self, step: int, fingerprints: bool = False) -> dict[str, Any]:
        return self.loader.stats(step, fingerprints)


def build_prefetched_loader(cfg, dp_rank: int, dp_size: int, device: torch.device, consumed_samples: int = 0,
                            last_step: Optional[int] = None,
                            skipped_steps: Sequence[tuple[int, int]] = (),
                            earlier_order_keys: Sequence[str] = ()) -> PrefetchingLoader:
    """This rank's batch feed for the trainer, reading with `cfg.data.loader` (pytorch | dali); `last_step`
    (the run's last step) keeps it from reading past the end of the run, and the batches of `skipped_steps`
    (inclusive ranges) are not read ahead; `earlier_order_keys` as for `build_train_loader`."""
    loader = build_train_loader(cfg, dp_rank, dp_size, consumed_samples, earlier_order_keys)
    if cfg.data.loader == "dali":
        from .dali_loader import DaliBatchReader
        # a jump over skipped steps restarts its pipeline; it never reads them ahead either
        reader = DaliBatchReader(loader, device, last_step, skipped_steps=skipped_steps)
        return PrefetchingLoader(loader, reader.read_batch, device, last_step, reader.close, reader.describe(),
                                 skipped_steps=skipped_steps)
    read = functools.partial(loader.read_batch, pin_memory=device.type == "cuda")
    return PrefetchingLoader(loader, read, device, last_step, name="pytorch (pinned)" if device.type == "cuda"
                             else "pytorch", skipped_steps=skipped_steps)
