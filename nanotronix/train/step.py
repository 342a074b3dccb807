"""One optimizer step in any TP x PP x DP layout: micro-batches through the pipeline, gradient reduction,
global-norm clipping, AdamW update (skipped when the loss or the gradient norm is not finite), and the global-batch
loss.

The same step runs one process or many: with tp = pp = dp = 1 it is the plain gradient-accumulation loop, and every
layout reproduces that run's losses and weights (tests/test_parallel_layouts.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from nanotronix.parallel.clip import clip_grad_norm_and_reduce_loss
from nanotronix.parallel.model import ParallelModel
from nanotronix.parallel.optimizer import DistributedOptimizer
from nanotronix.train.spike_guard import SpikeGuard


@dataclass
class StepResult:
    loss: float  # mean next-token loss over the global batch (the same value on every rank)
    grad_norm: float  # global L2 norm of the gradient before clipping
    applied: bool = True  # False: the weights were left unchanged (not finite, or a spike: see `spike`)
    spike: Optional[str] = None  # why the spike guard skipped the update (train.spike_skip_sigma)


def train_step(model: ParallelModel, optimizer: DistributedOptimizer, batch: torch.Tensor, lr: float,
               clip_grad: float, guard: Optional[SpikeGuard] = None) -> StepResult:
    """batch: [grad_accum, micro_batch, seq_len + 1] token ids of this data-parallel rank's share of the global
    batch (every rank of a pipeline/TP group passes the same batch). clip_grad <= 0 disables clipping. `guard`:
    the update is skipped when it judges the step's loss or gradient norm a spike."""
    ctx = model.ctx
    device = model.runner.device
    batch = batch.to(device, non_blocking=True).long()  # the loader ships int32 (nanotronix/data/loader.py)
    num_microbatches = batch.shape[0]
    model.grads.start(num_microbatches)
    # Each micro-batch loss is a mean over its tokens; 1/(micro-batches * dp) makes the DP sum the global mean.
    local_loss = model.runner.run(batch[..., :-1], batch[..., 1:], scale=1.0 / (num_microbatches * ctx.dp))
    model.grads.finish()
    if ctx.tp_rank != 0:  # every TP rank computed the same loss: count it once
        local_loss = torch.zeros_like(local_loss)
    grad_norm, loss = clip_grad_norm_and_reduce_loss(optimizer, ctx, clip_grad, local_loss)
    if not (math.isfinite(grad_norm) and math.isfinite(loss)):
        # An inf/nan gradient would poison the weights and the AdamW moments for good (and a checkpoint saved after
        # it): leave them as they are. The loss and the norm are global, so every rank decides the same.
        return StepResult(loss=loss, grad_norm=grad_norm, applied=False)
    spike = guard.judge(loss, grad_norm) if guard is not None else None
    if spike is not None:  # the same decision on every rank: the loss and the norm are global
        return StepResult(loss=loss, grad_norm=grad_norm, applied=False, spike=spike)
    optimizer.step(lr)
    return StepResult(loss=loss, grad_norm=grad_norm)
