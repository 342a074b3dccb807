"""Rotary position embedding in the non-interleaved (Hugging Face "rotate-half") layout.

The first half of each head's channels pairs with the second half, which is what `transformers`'
LlamaRotaryEmbedding does, so an export to Hugging Face needs no q/k row permutation.
"""
from __future__ import annotations

import torch

ROPE_LAYOUT = "rotate_half"


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [S, head_dim] (fp32) for integer positions [S], or [B, S, head_dim] for per-row
    positions [B, S] (document masking restarts them within a row)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, head_dim]; cos/sin: [S, head_dim] or [B, S, head_dim]. Computed in x's dtype, like
    transformers."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.dim() == 3:  # per-row positions: broadcast over the heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
