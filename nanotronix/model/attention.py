"""Causal self-attention with grouped-query heads and one fused QKV projection.

`qkv_proj.weight` rows are ordered by KV group: for each KV head g, the rows of its query heads
(g*r .. g*r+r-1, r = heads / kv_heads), then the rows of k_g, then v_g. Query head h therefore attends with
KV head h // r, the grouping of transformers' `repeat_kv` and of SDPA's `enable_gqa`. Because whole groups are
contiguous, a tensor-parallel rank's shard is a contiguous row block of this weight, so TP shards, checkpoints
and the Hugging Face mapping all see the same logical tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nanotronix import accel
from nanotronix.model.documents import Documents
from nanotronix.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, attn_backend: str = "sdpa"):
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.group_size = num_heads // num_kv_heads  # query heads per KV head; the same on every TP rank
        rows = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, rows, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Optional[Documents] = None) -> torch.Tensor:
        r, d = self.group_size, self.head_dim
        qkv = self.qkv_proj(x)  # [B, S, ...]: under sequence parallelism x holds S / tp tokens and qkv_proj gathers
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, -1, r + 2, d)  # [B, S, KV_local, r + 2, D]
        q = qkv[:, :, :, :r].reshape(b, s, -1, d).transpose(1, 2)  # [B, H_local, S, D]
        k = qkv[:, :, :, r].transpose(1, 2)  # [B, KV_local, S, D]
        # a copy: attention keeps v for its backward, and a view would keep the whole QKV output alive with it; laid
        # out [B, S, KV, D] in memory as RoPE leaves q and k (what flash attention reads)
        v = qkv[:, :, :, r + 1].contiguous().transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = accel.ATTENTION_BACKENDS[self.attn_backend](q, k, v, documents)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
