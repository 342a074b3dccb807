"""One optimizer step: forward/backward over the step's micro-batches, gradient clipping, AdamW update."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from nanotronix.model import cross_entropy


@dataclass
class StepResult:
    loss: float  # mean next-token loss over the global batch
    grad_norm: float  # global L2 norm of the gradient before clipping


def autocast_context(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, lr: float,
               clip_grad: float, dtype: str, device: torch.device) -> StepResult:
    """batch: [grad_accum, micro_batch, seq_len + 1] token ids of this rank's share of the global batch."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    accum = batch.shape[0]
    total = torch.zeros((), device=device)
    for micro in batch:
        micro = micro.to(device, non_blocking=True)
        with autocast_context(device, dtype):
            logits = model(micro[:, :-1])
        loss = cross_entropy(logits, micro[:, 1:])
        (loss / accum).backward()
        total += loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = clip_grad if clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=(total / accum).item(), grad_norm=grad_norm.item())
