"""Tensor-parallel layers: column- and row-parallel linears and a vocab-parallel embedding (Megatron-LM style).

Every weight is a plain local `nn.Parameter` holding rank r's contiguous chunk r of the logical (plain model)
weight along `param.tp_shard_dim` (0: rows / output features, 1: columns / input features); replicated
parameters carry `tp_shard_dim = None`. Checkpoints and the optimizer rely on exactly that, so the layers are
hand-written (torch's DTensor `parallelize_module` would turn the parameters into DTensors).

The communication of each layer:
  ColumnParallelLinear  input:  "copy" (identity, grads all-reduced) or "gather_sequence" (sequence parallel:
                                all-gathered, grads reduce-scattered), in one autograd function with the matmul
                                (`column_parallel_matmul`: overlaps them with the backward's GEMMs)
  RowParallelLinear     output: "reduce" (all-reduce) or "reduce_scatter_sequence" (sequence parallel)
  VocabParallelEmbedding        rows of the vocabulary; output all-reduced or reduce-scattered over the sequence
The row-parallel and embedding reductions are differentiable collectives from `mappings`.
The fused QKV and gate/up weights of the model are laid out so that TP chunk r is contiguous (see
`nanotronix/model/attention.py` and `mlp.py`), so a column-parallel shard of them is just a row block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanotronix.model.loss import InputCollectives
from nanotronix.parallel import mappings
from nanotronix.parallel.column_parallel_matmul import column_parallel_matmul
from nanotronix.parallel.grad_accumulation_fusion import linear_accumulating_weight_grad
from nanotronix.parallel.mappings import Group

COLUMN_INPUT_MODES = ("copy", "gather_sequence")
ROW_OUTPUT_MODES = ("reduce", "reduce_scatter_sequence")


def shard(tensor: torch.Tensor, dim: int, group: Group) -> nn.Parameter:
    """Rank r's contiguous chunk r of `tensor` along `dim`, as a new parameter tagged with `tp_shard_dim`."""
    n, r = mappings.group_size(group), mappings.group_rank(group)
    if tensor.shape[dim] % n:
        raise ValueError(f"dimension {dim} of a {tuple(tensor.shape)} weight is not divisible by tp={n}")
    param = nn.Parameter(tensor.detach().chunk(n, dim=dim)[r].clone())
    param.tp_shard_dim = dim
    return param


class _ParallelLinear(nn.Module):
    # During a bf16 training step with train.bf16_weight_cache: the weight's bf16 copy that the matmul uses
    # instead of `weight` (nanotronix/parallel/compute_weights.py); None otherwise.
    compute_weight = None
    # ... and with train.grad_accumulation_fusion the fp32 buffer (`weight.main_grad`) that the backward's wgrad GEMM
    # accumulates into directly (nanotronix/parallel/grad_accumulation_fusion.py); None otherwise.
    weight_grad_target = None

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_weight is None:
            return F.linear(x, self.weight)
        if self.weight_grad_target is None:
            return F.linear(x, self.compute_weight)
        return linear_accumulating_weight_grad(x, self.compute_weight, self.weight_grad_target)


class ColumnParallelLinear(_ParallelLinear):
    """y_r = x W_r^T with W_r the r-th row block of the [out, in] weight; the output stays split over TP."""

    def __init__(self, weight: nn.Parameter, group: Group, input_mode: str = "copy",
                 keep_gathered_input: bool = False):
        super().__init__()
        if input_mode not in COLUMN_INPUT_MODES:
            raise ValueError(f"input_mode {input_mode!r} is not one of {COLUMN_INPUT_MODES}")
        if getattr(weight, "tp_shard_dim", 0) != 0:
            raise ValueError("a column-parallel weight must be split along dim 0")
        self.weight = weight
        self.group = group
        self.input_mode = input_mode
        # gather_sequence: keep the gathered input for backward instead of gathering it again there (what
        # activation recomputation wants; column_parallel_matmul.py)
        self.keep_gathered_input = keep_gathered_input

    @classmethod
    def from_dense(cls, dense_weight: torch.Tensor, group: Group, input_mode: str = "copy",
                   keep_gathered_input: bool = False) -> "ColumnParallelLinear":
        return cls(shard(dense_weight, 0, group), group, input_mode, keep_gathered_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if mappings.group_size(self.group) == 1:
            return self._matmul(x)
        weight = self.weight if self.compute_weight is None else self.compute_weight
        return column_parallel_matmul(x, weight, self.group, self.input_mode == "gather_sequence",
                                      self.weight_grad_target, self.keep_gathered_input)

    def input_collectives(self) -> InputCollectives:
        """The input's collectives, for a loss that applies the head itself (`parallel.cross_entropy`): what every
        rank multiplies, and its gradient summed back to this rank's input."""
        group = self.group
        if self.input_mode == "copy":
            return InputCollectives(None, lambda grad: mappings.start_all_reduce(grad, group, False)())
        return InputCollectives(lambda x: mappings.start_all_gather_seq(x, group, False)(),
                                lambda grad: mappings.start_reduce_scatter_seq(grad, group, False)())

    def extra_repr(self) -> str:
        kept = ", keeps the gathered input" if self.input_mode == "gather_sequence" and self.keep_gathered_input else ""
        return f"local_weight={tuple(self.weight.shape)}, input={self.input_mode}{kept}"


class RowParallelLinear(_ParallelLinear):
    """y = sum_r x_r W_r^T with W_r the r-th column block; input split over TP, output summed over TP."""

    def __init__(self, weight: nn.Parameter, group: Group, output_mode: str = "reduce"):
        super().__init__()
        if output_mode not in ROW_OUTPUT_MODES:
            raise ValueError(f"output_mode {output_mode!r} is not one of {ROW_OUTPUT_MODES}")
        self.weight = weight
        self.group = group
        self.output_mode = output_mode

    @classmethod
    def from_dense(cls, dense_weight: torch.Tensor, group: Group, output_mode: str = "reduce") -> "RowParallelLinear":
        return cls(shard(dense_weight, 1, group), group, output_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self._matmul(x)
        if self.output_mode == "reduce_scatter_sequence":
            return mappings.reduce_scatter_to_sequence(partial, self.group)
        return mappings.reduce_from_tp(partial, self.group)

    def extra_repr(self) -> str:
        return f"local_weight={tuple(self.weight.shape)}, output={self.output_mode}"


class VocabParallelEmbedding(nn.Module):
    """Rank r holds vocabulary rows [r*V/tp, (r+1)*V/tp); ids outside contribute zeros, then the ranks sum."""

    def __init__(self, weight: nn.Parameter, group: Group, sequence_parallel: bool = False):
        super().__init__()
        self.weight = weight
        self.group = group
        self.sequence_parallel = sequence_parallel
        rows = weight.shape[0]
        self.vocab_start = mappings.group_rank(group) * rows
        self.vocab_end = self.vocab_start + rows

    @classmethod
    def from_dense(cls, dense_weight: torch.Tensor, group: Group,
                   sequence_parallel: bool = False) -> "VocabParallelEmbedding":
        return cls(shard(dense_weight, 0, group), group, sequence_parallel)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if mappings.group_size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence(partial, self.group)
        return mappings.reduce_from_tp(partial, self.group)

    def extra_repr(self) -> str:
        return f"vocab=[{self.vocab_start}, {self.vocab_end}), sequence_parallel={self.sequence_parallel}"
