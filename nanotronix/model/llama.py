"""The plain PyTorch SmolLM2 / Llama decoder: pre-RMSNorm blocks, GQA attention, SwiGLU, RoPE, tied head.

This file knows nothing about parallelism. `nanotronix.parallel` turns it into a distributed model by swapping
layers for tensor-parallel ones and by removing what a pipeline stage does not own: `embed_tokens`, `norm` and
`lm_head` may be None and `layers` is a ModuleDict keyed by the global layer index, so parameter names stay the
same on every stage and in every checkpoint.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from nanotronix.config import ModelConfig
from nanotronix.model.attention import Attention
from nanotronix.model.documents import Documents
from nanotronix.model.mlp import SwiGLU
from nanotronix.model.norm import RMSNorm
from nanotronix.model.rope import rope_cos_sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, attn_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Optional[Documents] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, documents)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.embed_tokens: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, attn_backend) for i in range(cfg.num_hidden_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head: Optional[nn.Linear] = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    def init_weights(self) -> None:
        """nanotron's init for SmolLM2 (its StandardParametrizator): Normal(0, init_std) for the embedding, the
        head and the column-parallel matrices (qkv, gate/up), Normal(0, init_std / sqrt(2 * layers)) for the two
        that write into the residual stream (o_proj, down_proj: the row-parallel ones), ones for norms."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for layer in self.layers.values():
            writes_residual = {layer.self_attn.o_proj, layer.mlp.down_proj}
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, mean=0.0, std=residual_std if module in writes_residual else std)
        for module in (self.embed_tokens, self.lm_head):
            nn.init.normal_(module.weight, mean=0.0, std=std)  # tied: the same tensor, drawn again
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()

    def forward(self, x: torch.Tensor, skip_head: bool = False) -> torch.Tensor:
        """Token ids [B, S] -> logits [B, S, V] (or the final norm's output with skip_head)."""
        return decoder_forward(self, x, skip_head=skip_head)


def decoder_forward(parts: nn.Module, x: torch.Tensor, skip_head: bool = False,
                    documents: Optional[Documents] = None, seq_shards: int = 1) -> torch.Tensor:
    """The one decoder pass, shared by `Llama` and the pipeline stages (`parallel.model.ModelChunk`), which hold a
    subset of the same parts: `embed_tokens`, `norm` and `lm_head` may be None and `layers` a slice.

    x: token ids [B, S] when `parts` has the embedding, else hidden states [B, S / seq_shards, D] (sequence
    parallelism shards them; RoPE and attention still see all S positions). documents: the window's document
    layout, computed here from the token ids under document masking, passed in by later pipeline stages (which
    compute it from the micro-batch's token ids themselves).
    skip_head: return the final norm's output instead of logits, for a loss that applies the head itself
    (`linear_cross_entropy`, which never materialises the full logits). Returns the output."""
    cfg = parts.config
    if parts.embed_tokens is not None:
        if cfg.document_mask_eos_id is not None:
            documents = Documents.from_tokens(x, cfg.document_mask_eos_id)
        h = parts.embed_tokens(x)
    else:
        h = x
    if documents is not None and len(parts.layers):
        documents.prepare(next(iter(parts.layers.values())).self_attn.attn_backend)
    positions = documents.positions if documents is not None else \
        torch.arange(h.shape[1] * seq_shards, device=h.device)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    for layer in parts.layers.values():
        h = layer(h, cos, sin, documents)
    if parts.norm is not None:
        h = parts.norm(h)
    if parts.lm_head is not None and not skip_head:
        h = parts.lm_head(h)
    return h


def build_model(cfg: ModelConfig, attn_backend: str = "sdpa", device: Optional[torch.device] = None) -> Llama:
    with torch.device(device or "cpu"):
        return Llama(cfg, attn_backend)
