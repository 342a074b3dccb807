"""Validation loss during training (config section `validation`).

Every `validation.interval` steps and after the last one, the training model scores the first K =
`validation.num_samples` windows of each held-out store of `validation.data`: window i is stream tokens
[i*L, i*L + L + 1) with L = train.seq_len, the windows `python -m nanotronix.evaluate` reads, so each logged loss
can be recomputed from the checkpoint saved at that step (exactly in fp32; under bf16 the trainer's autocast rounds
differently from the command's fp32 forward). It runs in the training layout and precision (TP x PP x DP,
document masking when on). `val_losses` holds each store's loss, keyed by its path relative to data.root (e.g. one
store per domain: web, code, math, to watch what a stage's mixture does to each), and `val_loss` their mean (each
store weighs the same).

Each store's K windows are split into contiguous blocks over the data-parallel ranks; each rank reads its blocks
once, at start-up (K x (L + 1) tokens / dp per store). A rank runs a block in rounds shaped like a training step
(micro-batches x micro-batch size), so the pipeline schedule built for training serves, forward only; the last
round is padded with rows that count for nothing (`pipeline.PAD_LABEL`). Every window has L targets, so a store's
loss is the mean of its windows' mean losses: one all-reduce of every store's sum per pass.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from nanotronix.config import Config, grad_accum_steps
from nanotronix.data import DataError, TokenStore, first_outside_vocabulary, open_store, require_integer_tokens
from nanotronix.data.schedule import dataset_order_key
from nanotronix.errors import UserError
from nanotronix.parallel.context import ParallelContext
from nanotronix.parallel.pipeline import PAD_LABEL


def open_validation_store(path: str, num_samples: int, seq_len: int, vocab_size: int) -> TokenStore:
    """A held-out store, checked to hold `num_samples` windows of seq_len + 1 tokens of the model's vocabulary (as
    far as its sidecar tells; the launch preflight calls this too)."""
    store = require_integer_tokens(open_store(path), path)
    if store.vocab_size is not None and store.vocab_size > vocab_size:
        raise DataError(f"validation.data: {path} was tokenized with {store.vocab_size} tokens, more than "
                        f"model.vocab_size={vocab_size}")
    needed = num_samples * seq_len + 1
    if needed > store.num_tokens:
        raise DataError(f"validation.num_samples: {num_samples} windows of {seq_len} tokens need {needed} tokens, "
                        f"{path} has {store.num_tokens}")
    return store


def check_torch_supports(ctx: ParallelContext) -> None:
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle
    if ctx.pp > 1 and not hasattr(PipelineScheduleSingle, "eval"):
        raise UserError(f"validation.interval: validation under pipeline parallelism needs torch >= 2.9 (forward-only "
                        f"pipeline schedules); this is torch {torch.__version__}")


class Validator:
    def __init__(self, model, ctx: ParallelContext, sources: dict[str, Callable[[int, int], torch.Tensor]],
                 num_samples: int, micro_batches: int, micro_batch_size: int):
        """sources: name -> read_windows(first, count), which returns windows first .. first + count - 1 of that
        store's `num_samples` as [count, L + 1] token ids; called once per store, for this data-parallel rank's
        block."""
        self.model = model
        self.ctx = ctx
        self.num_samples = num_samples
        self.stores: dict[str, TokenStore] = {}  # path -> the opened store (from_config)
        self.names = list(sources)
        per_rank = math.ceil(num_samples / ctx.dp)
        first = min(num_samples, ctx.dp_rank * per_rank)
        count = min(num_samples, first + per_rank) - first
        round_rows = micro_batches * micro_batch_size
        rounds = max(1, math.ceil(per_rank / round_rows))  # the same on every rank
        shape = (rounds, micro_batches, micro_batch_size, -1)
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []  # per store: (inputs, labels) in rounds
        for read_windows in sources.values():
            windows = read_windows(first, count)
            padded = torch.zeros((rounds * round_rows, windows.shape[1]), dtype=torch.long)
            padded[:count] = windows
            labels = padded[:, 1:].clone()
            labels[count:] = PAD_LABEL
            self.blocks.append((padded[:, :-1].reshape(shape), labels.reshape(shape)))

    @classmethod
    def from_config(cls, cfg: Config, ctx: ParallelContext, model) -> Optional["Validator"]:
        """None when validation is off; otherwise read this rank's windows (one-line errors on a bad store)."""
        v, t = cfg.validation, cfg.train
        if v.interval == 0:
            return None
        check_torch_supports(ctx)

        stores: dict[str, TokenStore] = {}

        def reader(path: str):
            store = stores[path] = open_validation_store(path, v.num_samples, t.seq_len, cfg.model.vocab_size)

            def read_windows(first: int, count: int) -> torch.Tensor:
                windows = store.leading_windows(first, count, t.seq_len)
                bad = first_outside_vocabulary(windows, cfg.model.vocab_size)  # negative ids too
                if bad is not None:
                    raise DataError(f"validation.data: token id {bad} in {path} is outside the model's vocabulary "
                                    f"({cfg.model.vocab_size})")
                return torch.from_numpy(windows)
            return read_windows

        sources = {dataset_order_key(path, cfg.data.root): reader(path) for path in v.data}
        validator = cls(model, ctx, sources, v.num_samples, grad_accum_steps(cfg, ctx.dp), t.micro_batch_size)
        validator.stores = stores
        return validator

    def run(self) -> dict[str, float]:
        """Each store's mean loss with the current weights, by name; collective: every rank calls it."""
        model = self.model
        model.grads.wait_for_weights()  # ZeRO-1: this rank's weights are whole and fp32 (collective)
        device = model.runner.device
        sums = torch.zeros(len(self.blocks), dtype=torch.float64, device=device)
        for k, (inputs, labels) in enumerate(self.blocks):
            for x, y in zip(inputs, labels):
                sums[k] += model.runner.evaluate(x.to(device), y.to(device)).double()
        if self.ctx.tp_rank != 0:  # every TP rank computed the same losses: count them once
            sums.zero_()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        return dict(zip(self.names, (sums / self.num_samples).tolist()))


def mean_loss(losses: dict[str, float]) -> float:
    """`val_loss`: the mean over every store's windows (all stores hold the same number)."""
    return sum(losses.values()) / len(losses)
