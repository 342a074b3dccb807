"""The column-parallel matmul under sequence parallelism: all-gather the input's sequence shards, then multiply.

Under sequence parallelism each TP rank holds 1/tp of the sequence between the layers, and a column-parallel
linear needs the whole sequence: y_r = gather(x) W_r^T. Written as a collective followed by a linear (what
`mappings.gather_from_sequence` + F.linear give), autograd keeps the gathered input for the weight gradient:
tp times the shard, on every rank, for each of the two such linears of a layer (qkv and gate/up). This function
instead (Megatron-LM's choice for its sequence-parallel linears):
  - casts the shard to the compute dtype before gathering it (bf16 under autocast: half the bytes of gathering the
    fp32 norm output and casting after, the same values);
  - keeps only this rank's shard (in the compute dtype) for backward and gathers it again there, started before
    the input-gradient GEMM so that the two overlap; the input gradient's reduce-scatter runs during the weight
    gradient GEMM. Per layer that saves 2 (1 - 1/tp) S d bytes per sequence in bf16: at tp 2 for SmolLM2-1.7B,
    ~12% of what a layer keeps.
  - with `keep_gathered` (under activation recomputation) keeps the gathered input instead: the recomputed forward
    gathers it anyway, and a second gather in backward would only add traffic (nothing is kept between layers).
The input gradient is reduce-scattered in the input's own dtype (fp32 for the fp32 residual stream), as the
collective + linear path does, so both give bit-identical results (tests/test_parallel_layers.py).
The weight gradient is returned, or with `main_grad` (train.grad_accumulation_fusion) accumulated into it by the
wgrad GEMM (`grad_accumulation_fusion.accumulate_weight_grad`). Hand-written: torch's own sequence-parallel
styles (DTensor) gather through autograd and keep the gathered input.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nanotronix.parallel import mappings
from nanotronix.parallel.grad_accumulation_fusion import accumulate_weight_grad
from nanotronix.parallel.mappings import Group


def compute_dtype_of(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear of `x` and `weight` multiplies in: autocast's when it is on (and the weight is a float
    that autocast casts), else the weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and weight.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _GatherSequenceLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, main_grad, group, dtype, keep_gathered):
        shard = x.to(dtype)
        w = weight.to(dtype)
        gathered = mappings.start_all_gather_seq(shard, group, async_op=False)()
        with torch.autocast(x.device.type, enabled=False):  # both operands are already in the compute dtype
            out = F.linear(gathered, w)
        ctx.save_for_backward(gathered if keep_gathered else shard, w)
        ctx.keep_gathered = keep_gathered
        # An attribute, not a saved tensor: accumulating into the bucket bumps its version counter (see
        # grad_accumulation_fusion._LinearAccumulatingWeightGrad)
        ctx.main_grad = main_grad
        ctx.group = group
        ctx.input_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, w = ctx.saved_tensors
        # torch.compile traces collectives only as synchronous calls (it turns them into functional collectives
        # and schedules their waits itself); eager starts each one before the GEMM it overlaps with
        overlap = not torch.compiler.is_compiling()
        gather = (lambda: saved) if ctx.keep_gathered else mappings.start_all_gather_seq(saved, ctx.group, overlap)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # reduce-scattered in the input's dtype, as autograd's cast + gather_from_sequence would
            grad_x = mappings.start_reduce_scatter_seq((grad_out @ w).to(ctx.input_dtype), ctx.group, overlap)
        gathered = gather()
        grad_w = None
        if ctx.main_grad is not None:
            accumulate_weight_grad(ctx.main_grad, grad_out.flatten(0, -2), gathered.flatten(0, -2))
        elif ctx.needs_input_grad[1]:
            grad_w = (grad_out.flatten(0, -2).t() @ gathered.flatten(0, -2)).to(ctx.weight_dtype)
        return (grad_x() if grad_x is not None else None), grad_w, None, None, None, None


def gather_sequence_linear(x: torch.Tensor, weight: torch.Tensor, group: Group,
                           main_grad: Optional[torch.Tensor] = None, keep_gathered: bool = False) -> torch.Tensor:
    """F.linear(gather_from_sequence(x), weight) over the TP `group` (see the module docstring); `main_grad`: the
    fp32 buffer the weight gradient is accumulated into instead of returned."""
    return _GatherSequenceLinear.apply(x, weight, main_grad, group, compute_dtype_of(x, weight), keep_gathered)
