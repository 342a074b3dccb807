"""Validation loss during training (config section `validation`).

Every `validation.interval` steps and after the last one, the training model scores the first K =
`validation.num_samples` windows of a held-out store: window i is stream tokens [i*L, i*L + L + 1) with L =
train.seq_len, the windows `python -m nanotronix.evaluate` reads, so the logged `val_loss` can be recomputed from the
checkpoint saved at that step (exactly in fp32; under bf16 the trainer's autocast rounds differently from the
command's fp32 forward). It runs in the training layout and precision (TP x PP x DP, document masking when on).

The K windows are split into contiguous blocks over the data-parallel ranks; each rank reads its block once, at
start-up (K x (L + 1) tokens / dp). A rank runs its block in rounds shaped like a training step (micro-batches x
micro-batch size), so the pipeline schedule built for training serves, forward only; the last round is padded with
rows that count for nothing (`pipeline.PAD_LABEL`). Every window has L targets, so the validation loss is the mean
of the windows' mean losses: one all-reduce of each rank's sum, the same value on every rank.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from nanotronix.config import Config, ValidationConfig, grad_accum_steps
from nanotronix.data import DataError, TokenStore, open_store
from nanotronix.errors import UserError
from nanotronix.parallel.context import ParallelContext
from nanotronix.parallel.pipeline import PAD_LABEL


def open_validation_store(v: ValidationConfig, seq_len: int, vocab_size: int) -> TokenStore:
    """The held-out store, checked to hold K windows of seq_len + 1 tokens of the model's vocabulary (as far as its
    sidecar tells; the launch preflight calls this too)."""
    store = open_store(os.path.expanduser(v.data))
    if store.vocab_size is not None and store.vocab_size > vocab_size:
        raise DataError(f"validation.data: {v.data} was tokenized with {store.vocab_size} tokens, more than "
                        f"model.vocab_size={vocab_size}")
    needed = v.num_samples * seq_len + 1
    if needed > store.num_tokens:
        raise DataError(f"validation.num_samples: {v.num_samples} windows of {seq_len} tokens need {needed} tokens, "
                        f"{v.data} has {store.num_tokens}")
    return store


def check_torch_supports(ctx: ParallelContext) -> None:
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle
    if ctx.pp > 1 and not hasattr(PipelineScheduleSingle, "eval"):
        raise UserError(f"validation.interval: validation under pipeline parallelism needs torch >= 2.9 (forward-only "
                        f"pipeline schedules); this is torch {torch.__version__}")


class Validator:
    def __init__(self, model, ctx: ParallelContext, read_windows: Callable[[int, int], torch.Tensor], total: int,
                 micro_batches: int, micro_batch_size: int):
        """read_windows(first, count): windows first .. first + count - 1 of the `total`, as [count, L + 1] token ids;
        called once, for this data-parallel rank's block."""
        self.model = model
        self.ctx = ctx
        self.total = total
        per_rank = math.ceil(total / ctx.dp)
        first = min(total, ctx.dp_rank * per_rank)
        count = min(total, first + per_rank) - first
        windows = read_windows(first, count)
        round_rows = micro_batches * micro_batch_size
        rounds = max(1, math.ceil(per_rank / round_rows))  # the same on every rank
        padded = torch.zeros((rounds * round_rows, windows.shape[1]), dtype=torch.long)
        padded[:count] = windows
        labels = padded[:, 1:].clone()
        labels[count:] = PAD_LABEL
        shape = (rounds, micro_batches, micro_batch_size, -1)
        self.inputs = padded[:, :-1].reshape(shape)
        self.labels = labels.reshape(shape)

    @classmethod
    def from_config(cls, cfg: Config, ctx: ParallelContext, model) -> Optional["Validator"]:
        """None when validation is off; otherwise read this rank's windows (one-line errors on a bad store)."""
        v, t = cfg.validation, cfg.train
        if v.interval == 0:
            return None
        check_torch_supports(ctx)
        store = open_validation_store(v, t.seq_len, cfg.model.vocab_size)

        def read_windows(first: int, count: int) -> torch.Tensor:
            windows = torch.from_numpy(store.leading_windows(first, count, t.seq_len))
            if count and int(windows.max()) >= cfg.model.vocab_size:
                raise DataError(f"validation.data: token id {int(windows.max())} in {v.data} is outside the model's "
                                f"vocabulary ({cfg.model.vocab_size})")
            return windows

        return cls(model, ctx, read_windows, v.num_samples, grad_accum_steps(cfg, ctx.dp), t.micro_batch_size)

    def run(self) -> float:
        """The mean loss over the windows with the current weights; collective: every rank calls it."""
        model = self.model
        model.grads.wait_for_weights()  # ZeRO-1: this rank's weights are whole and fp32 (collective)
        device = model.runner.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for inputs, labels in zip(self.inputs, self.labels):
            total += model.runner.evaluate(inputs.to(device), labels.to(device)).double()
        if self.ctx.tp_rank != 0:  # every TP rank computed the same losses: count them once
            total.zero_()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return total.item() / self.total
