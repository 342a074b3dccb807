"""SwiGLU feed-forward with one fused gate/up projection.

`gate_up_proj.weight` interleaves rows pairwise: row 2i is gate_i, row 2i+1 is up_i. Any contiguous row block of
even length holds matching gate/up pairs, so a tensor-parallel shard is a contiguous block of the logical weight
(the same property as the QKV layout) and one GEMM computes both halves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x).unflatten(-1, (-1, 2))
        return self.down_proj(F.silu(gate_up[..., 0]) * gate_up[..., 1])
