"""AdamW over this rank's parameters, or (ZeRO-1) over its 1/dp shard of them, with layout-agnostic state I/O.

The update itself is `torch.optim.AdamW` (fused on CUDA, foreach on CPU), so the numerics are torch's AdamW by
construction. What it updates are flat fp32 "pieces": each parameter's overlap with this rank's shard of its
gradient bucket (`data_parallel.Bucket.pieces`). A piece is a view into the bucket's parameter buffer, and its
`.grad` a view into the bucket's reduced gradient, so nothing is copied:
  zero_stage 0: the shard is the whole bucket: every DP rank updates every parameter (identically).
  zero_stage 1: rank d updates only its contiguous 1/dp of each bucket (optimizer state is 1/dp of the
                unsharded size), then the buckets are all-gathered over DP so every rank has the new weights
                (`GradBuffers.gather_weights`; with parallel.overlap_param_gather the next forward waits for them
                layer by layer).
The weights are fp32 (bf16 runs use autocast), so they are their own master copy.

Weight decay is decided per parameter by the caller's `param_groups` (the trainer's rule: none on 1-D tensors);
a piece inherits its parameter's group. AdamW is elementwise, so splitting a tensor into pieces changes nothing.

Checkpoint contract: `param_states(names)` returns {fqn: {"exp_avg", "exp_avg_sq"}} in TP-local, full (not DP-sharded)
shapes, gathered over DP under ZeRO-1 (without it, views of AdamW's own state: no copy on the GPU at a save);
`load_param_states(states, step_count)` scatters them back, for any subset of the parameters (a load hands over one
of `load_groups()` at a time: a bucket's parameters that this rank updates); `step_count` is the number of optimizer
steps taken (AdamW's bias-correction step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from nanotronix.parallel.data_parallel import Bucket
from nanotronix.parallel.mappings import all_gather_flat

STATE_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class Piece:
    """The part [start, end) of `bucket` that this rank updates, belonging to `param` (at `offset` in the bucket)."""
    tensor: torch.Tensor  # view into bucket.data; its .grad is a view into the bucket's reduced gradient
    bucket: Bucket
    param: nn.Parameter
    offset: int
    start: int
    end: int


class DistributedOptimizer:
    def __init__(self, model, param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 fused: Optional[bool] = None):
        self.model = model
        self.grads = model.grads
        ctx = model.ctx
        self.dp_group = ctx.dp_group if ctx.dp > 1 else None
        self.sharded = self.grads.zero_stage == 1 and ctx.dp > 1
        self.names = {id(p): name for name, p in model.named_parameters()}
        group_of = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
        missing = [self.names[id(p)] for p in model.parameters() if p.requires_grad and id(p) not in group_of]
        if missing:
            raise ValueError(f"parameters missing from the optimizer's param_groups: {missing[:3]}")

        pieces_by_group: list[list[torch.Tensor]] = [[] for _ in param_groups]
        self.pieces: list[Piece] = []
        for bucket in self.grads.buckets:
            for p, off, lo, hi in bucket.pieces():
                piece = bucket.data[lo:hi]
                piece.grad = bucket.shard_grad[lo - bucket.shard_start:hi - bucket.shard_start]
                pieces_by_group[group_of[id(p)]].append(piece)
                self.pieces.append(Piece(piece, bucket, p, off, lo, hi))
        groups = [dict({k: v for k, v in g.items() if k != "params"}, params=pieces)
                  for g, pieces in zip(param_groups, pieces_by_group) if pieces]
        self.inner: Optional[torch.optim.AdamW] = (
            torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused) if groups else None)
        self.step_count = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups if self.inner is not None else []

    def grad_pieces(self):
        """(gradient view, parameter) of every piece this rank updates."""
        return [(piece.tensor.grad, piece.param) for piece in self.pieces]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        if self.inner is not None:
            for group in self.inner.param_groups:
                group["lr"] = lr
            self.inner.step()
        self.step_count += 1
        if self.sharded:  # every rank gets the others' updated shards (in the background: overlap_param_gather)
            self.grads.gather_weights()

    # ---- checkpoint interface

    @torch.no_grad()
    def param_states(self, names: Optional[set[str]] = None) -> dict[str, dict[str, torch.Tensor]]:
        """{fqn: {"exp_avg", "exp_avg_sq"}} of the parameters in `names` (None: all): fp32, TP-local full shapes
        (zeros before the first step). To be read, not kept across a step: without ZeRO-1 they are the optimizer's own
        state tensors. Under ZeRO-1 every DP rank must call it (it gathers each bucket)."""
        return self._gathered_states(names) if self.sharded else self._own_states(names)

    def _own_states(self, names: Optional[set[str]]) -> dict[str, dict[str, torch.Tensor]]:
        """Without ZeRO-1 each piece is a whole parameter, so its moments are AdamW's own state tensors, handed out as
        views in the parameter's shape: a copy would cost GPU memory at every save (up to all the moments a rank
        writes), and a checkpoint only reads them (a sync save writes them before training goes on, an asynchronous
        one copies them to host memory first)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for piece in self.pieces:
            p, name = piece.param, self.names[id(piece.param)]
            if names is not None and name not in names:
                continue
            state = self.inner.state.get(piece.tensor)
            out[name] = {k: state[k].view_as(p).to(torch.float32) if state else
                         torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k in STATE_KEYS}
        return out

    def _gathered_states(self, names: Optional[set[str]]) -> dict[str, dict[str, torch.Tensor]]:
        """ZeRO-1: each bucket's moments gathered over DP from every rank's shard; only the named parameters' are
        kept (cloned out of the bucket-sized gather, freed with it), so a checkpoint's writer holds copies of what it
        writes alone."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for b in self.grads.buckets:
            shards = {k: torch.zeros(b.shard_end - b.shard_start, dtype=torch.float32, device=b.grad.device)
                      for k in STATE_KEYS}
            for piece in self.pieces:
                state = self.inner.state.get(piece.tensor) if piece.bucket is b else None
                for k in STATE_KEYS:
                    if state:
                        shards[k][piece.start - b.shard_start:piece.end - b.shard_start] = state[k]
            full = {}
            for k, shard in shards.items():
                full[k] = torch.empty(b.numel, dtype=torch.float32, device=shard.device)
                all_gather_flat(full[k], shard, group=self.dp_group)
            for p, off in zip(b.params, b.offsets):
                if names is None or self.names[id(p)] in names:
                    out[self.names[id(p)]] = {k: full[k][off:off + p.numel()].view_as(p).clone() for k in STATE_KEYS}
        return out

    def load_groups(self) -> list[list[str]]:
        """Per bucket, the parameters this rank updates a piece of (under ZeRO-1 those overlapping its shard): what
        a load reads at once, so it holds at most one bucket's full moments beyond the optimizer's own state."""
        return [[self.names[id(p)] for p, *_ in b.pieces()] for b in self.grads.buckets]

    @torch.no_grad()
    def load_param_states(self, states: dict[str, dict[str, torch.Tensor]], step_count: int) -> None:
        """Inverse of `param_states` for the parameters in `states` (each rank takes its pieces; the others keep their
        state); `step_count` is the steps already taken."""
        by_piece = {}
        for piece in self.pieces:
            p = piece.param
            name = self.names[id(p)]
            if name not in states:
                continue
            entry = {"step": torch.tensor(float(step_count))}
            for k in STATE_KEYS:
                full = states[name][k]
                if tuple(full.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {name}.{k} has shape {tuple(full.shape)}, this rank's "
                                     f"parameter has {tuple(p.shape)}")
                flat = full.reshape(-1)[piece.start - piece.offset:piece.end - piece.offset]
                entry[k] = flat.to(piece.tensor.device, torch.float32).clone()
            by_piece[id(piece.tensor)] = entry
        if self.inner is not None and by_piece:
            # torch places `step` where the group wants it (on the device when fused); the other pieces' state stays
            sd = self.inner.state_dict()
            order = [id(piece) for g in self.inner.param_groups for piece in g["params"]]
            sd["state"].update({i: by_piece[pid] for i, pid in enumerate(order) if pid in by_piece})
            self.inner.load_state_dict(sd)
        self.step_count = step_count
