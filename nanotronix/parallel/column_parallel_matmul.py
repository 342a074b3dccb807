"""The column-parallel matmul of a tensor-parallel layer, with its input's collective, as one autograd function.

A column-parallel linear multiplies the whole input by this rank's rows of the weight: y_r = X W_r^T. X is either
replicated over TP ("copy": the input gradient is then summed over the ranks) or, under sequence parallelism,
split over the sequence ("gather_sequence": all-gathered first, the input gradient reduce-scattered). Written as
that collective followed by F.linear (`mappings`), autograd runs the linear's whole backward and only then the
collective, and under sequence parallelism keeps the gathered input. This function instead does what Megatron-LM's
tensor-parallel linears do:
  - the input is cast to the compute dtype before it is gathered (bf16 under autocast: half the bytes of gathering
    the fp32 norm output and casting after; the same values);
  - "gather_sequence" keeps only this rank's sequence shard for backward and gathers it again there, started before
    the input-gradient GEMM so that the two overlap: per layer 2 (1 - 1/tp) S d bytes less per sequence in bf16
    (qkv and gate/up): for SmolLM2-1.7B 6% of what a layer kept at tp 2, 17% at tp 4, 32% at tp 8 (by
    tools/plan.py's count, which tests/test_plan_memory_parallel.py measures). With `keep_gathered` (activation
    recomputation) it keeps the gathered input instead: the recomputed forward gathers it anyway, and a second
    gather would only add traffic;
  - the input gradient's all-reduce ("copy") or reduce-scatter ("gather_sequence") is started as soon as that
    gradient exists and runs during the weight-gradient GEMM.
The input gradient is reduced in the input's own dtype (fp32 for the fp32 residual stream), as autograd's cast +
collective path does: both give bit-identical results (tests/test_parallel_layers.py; with a weight block of its own
on each rank, whose partial gradients a bf16 reduction would round differently: test_parallel_edge_cases.py). The
weight gradient is returned, or with `main_grad` (train.grad_accumulation_fusion) accumulated into it by the wgrad
GEMM (`grad_accumulation_fusion.accumulate_weight_grad`). Under torch.compile the collectives are issued
synchronously (dynamo traces only those, into functional collectives whose waits Inductor schedules). There
AOTAutograd traces forward and backward as one graph, whose partitioner would save the forward's gather for backward
(it never recomputes a collective on its own: ranks could decide differently) rather than gather the shard again; so
under sequence parallelism the compiled function runs inside torch.utils.checkpoint with a selective policy that
leaves the casts to the compute dtype and the matmul to the partitioner and marks the rest, the gather and the
copies that order its chunks, MUST_RECOMPUTE (a collective the user marks is recomputed): the compiled graph keeps
the shard and the compute-dtype weight, as eager does, and gathers again in backward, bit-identical
(tests/test_parallel_layers.py, with Inductor's partitioner and aot_eager's). Hand-written: torch's tensor-parallel
styles (DTensor) run the collective and the matmul as separate autograd steps.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nanotronix.parallel import mappings
from nanotronix.parallel.grad_accumulation_fusion import accumulate_weight_grad
from nanotronix.parallel.mappings import Group


def compute_dtype_of(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a linear of `x` and `weight` multiplies in: autocast's when it is on and the weight is fp32 (what
    autocast casts), else the weight's (a bf16 copy of train.bf16_weight_cache, or no autocast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and weight.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _ColumnParallelMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, main_grad, group, dtype, gather, keep_gathered):
        inp, w = x.to(dtype), weight.to(dtype)
        whole = mappings.start_all_gather_seq(inp, group, async_op=False)() if gather else inp
        with torch.autocast(x.device.type, enabled=False):  # both operands are already in the compute dtype
            out = F.linear(whole, w)
        ctx.regather = gather and not keep_gathered
        ctx.save_for_backward(inp if ctx.regather else whole, w)
        ctx.gather = gather
        # An attribute, not a saved tensor: accumulating into the bucket bumps its version counter (see
        # grad_accumulation_fusion._LinearAccumulatingWeightGrad)
        ctx.main_grad = main_grad
        ctx.group = group
        ctx.input_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, w = ctx.saved_tensors
        overlap = not torch.compiler.is_compiling()
        whole = mappings.start_all_gather_seq(saved, ctx.group, overlap) if ctx.regather else (lambda: saved)
        grad_x = None
        if ctx.needs_input_grad[0]:
            partial = (grad_out @ w).to(ctx.input_dtype)
            reduce = mappings.start_reduce_scatter_seq if ctx.gather else mappings.start_all_reduce
            grad_x = reduce(partial, ctx.group, overlap)
        inp = whole()
        grad_w = None
        if ctx.main_grad is not None:
            accumulate_weight_grad(ctx.main_grad, grad_out.flatten(0, -2), inp.flatten(0, -2))
        elif ctx.needs_input_grad[1]:
            grad_w = (grad_out.flatten(0, -2).t() @ inp.flatten(0, -2)).to(ctx.weight_dtype)
        return (grad_x() if grad_x is not None else None), grad_w, None, None, None, None, None


# The ops of the compiled function's forward whose outputs the partitioner may keep: the casts to the compute dtype
# (the shard and the weight that eager keeps) and the matmul (its output leaves the function; F.linear without a bias
# reaches the partitioner as mm). Everything else is recomputed in backward: the all-gather, its wait, and the copies
# that order the gathered chunks (naming only the gather would leave those copies' output to be saved).
_KEPT_OPS = {torch.ops.aten._to_copy.default, torch.ops.aten.mm.default}


def _regather_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_SAVE if op in _KEPT_OPS else CheckpointPolicy.MUST_RECOMPUTE


class _WithoutCheckpointAdvice(logging.Filter):
    """Drops torch's advice, logged once per process on every rank when a context_fn reaches torch.utils.checkpoint
    under torch.compile, to keep in-place ops out of the checkpointed region: this function's region has none
    (casts, the gather and its copies, mm), nor has the decoder layer that train.recompute selective checkpoints
    with its own policy, so the line would only be noise in each rank's log of a compiled run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint under torch.compile" not in record.getMessage()


# At import, not where the checkpoint is called: that code runs under dynamo's tracing. The logger torch logs it on.
logging.getLogger("torch._higher_order_ops.wrap").addFilter(_WithoutCheckpointAdvice())


def column_parallel_matmul(x: torch.Tensor, weight: torch.Tensor, group: Group, gather_sequence: bool,
                           main_grad: Optional[torch.Tensor] = None, keep_gathered: bool = False) -> torch.Tensor:
    """F.linear(X, weight) over the TP `group` (a group of more than one rank), X being `x` replicated
    (`gather_sequence` False) or `x`'s sequence shards all-gathered (True); see the module docstring. `main_grad`:
    the fp32 buffer the weight gradient is accumulated into instead of returned."""
    dtype = compute_dtype_of(x, weight)
    # Compiled, keeping the shard (module docstring): keep_gathered, so that the backward uses the forward's gather,
    # which the policy recomputes there from the shard, rather than a gather of its own, which works only while CSE
    # merges it into the forward's (unmerged, a collective of forward values is moved into the forward and saved).
    # Without gradients: no backward.
    if gather_sequence and not keep_gathered and torch.compiler.is_compiling() and torch.is_grad_enabled():
        return checkpoint(_ColumnParallelMatmul.apply, x, weight, main_grad, group, dtype, True, True,
                          use_reentrant=False,
                          context_fn=functools.partial(create_selective_checkpoint_contexts, _regather_policy))
    return _ColumnParallelMatmul.apply(x, weight, main_grad, group, dtype, gather_sequence, keep_gathered)
