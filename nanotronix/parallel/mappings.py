"""Differentiable collectives over the tensor-parallel group (Megatron-Core's `tensor_parallel/mappings.py` idea).

Each function is a collective in the forward pass paired with its adjoint in the backward pass, so the gradient of
a tensor-parallel layer is right by construction:

    copy_to_tp                 forward: identity             backward: all-reduce (sum of the ranks' partial grads)
    reduce_from_tp             forward: all-reduce           backward: identity
    gather_from_sequence       forward: all-gather seq dim   backward: reduce-scatter seq dim
    reduce_scatter_to_sequence forward: reduce-scatter seq   backward: all-gather seq dim
    scatter_to_sequence        forward: keep own seq chunk   backward: all-gather seq dim

The sequence dimension is dim 1 of [batch, seq, hidden] (the model is batch-first). The collectives of torch
(flat all-gather / reduce-scatter) work on dim 0, so we move the sequence chunks to the front with
one copy each way. Hand-written because `torch.distributed.nn.functional` has no identity/all-reduce pairs
(its all_reduce backward is an all-reduce, right only for a different use) and DTensor would make every layer
carry DTensor parameters, which the checkpoint and optimizer code deliberately keep as plain local tensors.
A group of size 1 (or None) makes every function the identity.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]

# Flat all-gather / reduce-scatter along dim 0. torch 2.13 renamed them (`*_single`) and deprecates the old names,
# which torch 2.11 (the GPU machines) still needs.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _seq_chunks_first(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S, ...] -> contiguous [n, B, S/n, ...]: sequence chunk r is row r."""
    b, s = x.shape[:2]
    return x.reshape(b, n, s // n, *x.shape[2:]).transpose(0, 1).contiguous()


def _seq_chunks_back(x: torch.Tensor) -> torch.Tensor:
    """[n, B, S/n, ...] -> [B, S, ...]."""
    n, b, s = x.shape[:3]
    return x.transpose(0, 1).reshape(b, n * s, *x.shape[3:])


def start_all_gather_seq(x: torch.Tensor, group: Group, async_op: bool = True) -> Callable[[], torch.Tensor]:
    """Start all-gathering the sequence shards [B, S/n, ...] of the group; the returned function waits for it and
    gives the whole [B, S, ...] (so the caller can compute something else meanwhile)."""
    n = group_size(group)
    # Both backends want the gathered dim 0 flat: [n * B, S/n, ...].
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    work = all_gather_flat(out, x.contiguous(), group=group, async_op=async_op)

    def finish() -> torch.Tensor:
        if async_op:  # else it has run (what torch returns then is no Work: under torch 2.11's dynamo, a tensor)
            work.wait()
        return _seq_chunks_back(out.view(n, *x.shape))
    return finish


def start_reduce_scatter_seq(x: torch.Tensor, group: Group, async_op: bool = True) -> Callable[[], torch.Tensor]:
    """Start summing [B, S, ...] over the group and scattering the sum's sequence chunks; the returned function
    waits for it and gives this rank's [B, S/n, ...]."""
    n = group_size(group)
    if x.shape[1] % n:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by the tensor-parallel size {n}")
    chunks = _seq_chunks_first(x, n)
    out = torch.empty(chunks.shape[1:], dtype=x.dtype, device=x.device)
    work = reduce_scatter_flat(out, chunks.flatten(0, 1), group=group, async_op=async_op)

    def finish() -> torch.Tensor:
        if async_op:  # else it has run (what torch returns then is no Work: under torch 2.11's dynamo, a tensor)
            work.wait()
        return out
    return finish


def start_all_reduce(x: torch.Tensor, group: Group, async_op: bool = True) -> Callable[[], torch.Tensor]:
    """Start summing `x` over the group in place (x must be the caller's own); the returned function waits for it
    and gives the sum."""
    work = dist.all_reduce(x, group=group, async_op=async_op)

    def finish() -> torch.Tensor:
        if async_op:  # else it has run (what torch returns then is no Work: under torch 2.11's dynamo, a tensor)
            work.wait()
        return x
    return finish


def _all_gather_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    return start_all_gather_seq(x, group, async_op=False)()


def _reduce_scatter_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    return start_reduce_scatter_seq(x, group, async_op=False)()


def _own_seq_chunk(x: torch.Tensor, group: Group) -> torch.Tensor:
    n, r = group_size(group), group_rank(group)
    if x.shape[1] % n:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by the tensor-parallel size {n}")
    return x.chunk(n, dim=1)[r].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


# The forwards below return a view of the tensor their collective wrote in place, not that tensor: torch 2.11's
# dynamo (the GPU machines') drops the autograd link of a Function's output written by a traced in-place collective,
# so under train.compile every gradient before a row-parallel linear was silently zero (a view keeps the link;
# tests/test_parallel_layouts.py's compiled layouts under torch 2.11). Eager and torch 2.13 need no view; it is free.
class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group).view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = _reduce_scatter_seq(x, group)
        return out.view_as(out)  # a view: see _ReduceFromTP

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_seq_chunk(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)
