"""The optional NVIDIA DALI input pipeline (`data.loader: dali`): the same batches as the PyTorch loader.

DALI has no reader for our token stores and no notion of the schedule-aware sampler, so the pipeline's one input
is an `fn.external_source` whose callback is the PyTorch loader's own pure sample function
(`TrainLoader.read_samples(global_sample_ids(step))`): DALI iteration i of a pipeline started at step s is the
batch of step s + i, so both loaders yield identical batches by construction, and a jump to another step (a
resume) simply starts a new pipeline there. What DALI adds is its execution engine: its own prefetch queue and,
on CUDA (pipeline `device_id` = the GPU), the copy to the GPU from its own pinned staging buffers on its own
stream, so batches arrive as CUDA tensors. On CPU (`device_id=None`) the pipeline only passes the arrays through;
`tools/bench_loader.py` measures what that costs.

The DALI modules come from `nanotronix.accel` (the one place that imports optional accelerators).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from nanotronix import accel
from nanotronix.errors import UserError

from .loader import TrainLoader

DALI_PACKAGE = "nvidia-dali-cuda120"


def require_dali():
    """DALI's modules (see accel.dali_modules), or a UserError saying how to install it."""
    dali = accel.dali_modules()
    if dali is None:
        raise UserError(f"data.loader: dali needs NVIDIA DALI, which is not installed (pip install {DALI_PACKAGE}, "
                        "or the nanotronix 'dali' extra); use data.loader=pytorch otherwise")
    return dali


class DaliBatchReader:
    """`read_batch(step)` through a DALI pipeline fed by `loader`'s sample function; call in step order for speed
    (any other order restarts the pipeline, with the same result). Not thread-safe: use from one thread."""

    def __init__(self, loader: TrainLoader, device: torch.device, last_step: int | None = None,
                 num_threads: int = 1, prefetch_queue_depth: int = 2,
                 skipped_steps: Sequence[tuple[int, int]] = ()):
        self.dali = require_dali()
        self.loader = loader
        self.last_step = last_step
        self.skipped_steps = list(skipped_steps)  # inclusive ranges whose batches are never read (train.skip_steps)
        # A read that failed ahead of its step (DALI's queue reads up to prefetch_queue_depth steps early): raised
        # when that step's batch is asked for, not out of an earlier step's
        self._errors: dict[int, Exception] = {}
        self.num_threads = num_threads
        self.prefetch_queue_depth = prefetch_queue_depth
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None  # a CPU-only pipeline: runs without CUDA
        self._iterator = None
        self._next_step: int | None = None

    def describe(self) -> str:
        where = "cpu" if self.device_id is None else f"cuda:{self.device_id}"
        return f"dali {self.dali.version} ({where})"

    def read_batch(self, step: int) -> torch.Tensor:
        """Batch of `step`: LongTensor [grad_accum, micro_batch_size, seq_len+1], on the GPU for a CUDA device."""
        if step != self._next_step:
            self._start(step)
        tokens = next(self._iterator)[0]["tokens"]
        self._next_step = step + 1
        if step in self._errors:
            error = self._errors.pop(step)
            self.close()  # the pipeline's later reads are of no use now
            raise error
        ld = self.loader
        return tokens.view(ld.grad_accum, ld.micro_batch_size, ld.seq_len + 1)

    def close(self) -> None:
        self._iterator = None  # releases the pipeline (and its threads)
        self._next_step = None
        self._errors.clear()

    def _start(self, first_step: int) -> None:
        """A new pipeline whose iteration i is step first_step + i."""
        self.close()
        dali, loader, last_step, errors = self.dali, self.loader, self.last_step, self._errors
        samples_per_step = loader.grad_accum * loader.micro_batch_size
        skipped = self.skipped_steps

        def step_tokens(info):
            # Called by DALI, possibly a few iterations ahead (its prefetch queue): the sample function is pure.
            step = first_step + info.iteration
            if last_step is not None and step > last_step:
                raise StopIteration  # the run ends here: nothing to read ahead
            placeholder = np.zeros((samples_per_step, loader.seq_len + 1), dtype=np.int32)
            if any(a <= step <= b for a, b in skipped):
                return placeholder  # never handed out: the trainer jumps over these steps (a new pipeline)
            try:
                return loader.read_samples(loader.global_sample_ids(step))  # int32 [samples_per_step, seq_len+1]
            except Exception as e:  # kept for its own step (read_batch), which may never come (a skip, the end)
                errors[step] = e
                return placeholder

        @dali.pipeline_def(batch_size=samples_per_step, num_threads=self.num_threads, device_id=self.device_id,
                           prefetch_queue_depth=self.prefetch_queue_depth)
        def token_pipeline():
            tokens = dali.fn.external_source(source=step_tokens, batch=True, batch_info=True,
                                             dtype=dali.types.INT32, ndim=1, name="tokens")
            return tokens.gpu() if self.device_id is not None else tokens

        self._iterator = dali.DALIGenericIterator(token_pipeline(), ["tokens"], auto_reset=False)
        self._next_step = first_step
