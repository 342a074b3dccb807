"""Fused forwards for the plain model's layers, swapped in by `parallel.speedups.apply_fused_kernels`.

Each class subclasses the plain layer and only overrides `forward`, so an instance's class can be switched in
place: parameters, their names and any tensor-parallel sub-layers stay exactly as they were (checkpoints and
the HF mapping do not see the difference).
"""
from __future__ import annotations

import torch

from nanotronix import accel
from nanotronix.kernels.functions import add_rms_norm, rms_norm, rope_split_qkv, swiglu
from nanotronix.model.attention import Attention
from nanotronix.model.llama import DecoderLayer
from nanotronix.model.mlp import SwiGLU


class FusedAttention(Attention):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, documents=None) -> torch.Tensor:
        if documents is not None:  # config validation rules this out; a direct caller gets told
            raise NotImplementedError("fused kernels with document masking are not yet implemented")
        qkv = self.qkv_proj(x)  # whole sequence (under sequence parallelism qkv_proj gathers x)
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, -1, self.group_size + 2, self.head_dim)
        q, k, v = rope_split_qkv(qkv, cos, sin)  # [B, S, heads, D]; SDPA takes the transposed views as they are
        out = accel.ATTENTION_BACKENDS[self.attn_backend](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class FusedSwiGLU(SwiGLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class FusedDecoderLayer(DecoderLayer):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, documents=None) -> torch.Tensor:
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        attn = self.self_attn(rms_norm(x, norm1.weight, norm1.eps), cos, sin, documents)
        normed, h = add_rms_norm(x, attn, norm2.weight, norm2.eps)  # residual add fused into the second norm
        return h + self.mlp(normed)


FUSED_CLASSES = {DecoderLayer: FusedDecoderLayer, Attention: FusedAttention, SwiGLU: FusedSwiGLU}
