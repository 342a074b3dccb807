"""Model FLOPs per token and MFU: the one FLOP counter of the project.

Counted (per token, forward + backward = 3x forward):
- matmuls: 6 * N_matmul, where N_matmul is every weight used in a matrix multiply: attention and MLP projections
  and the output head (a real [D x V] GEMM even when tied). The input embedding is a lookup, not a matmul, so it
  is NOT counted (counting it is a common MFU inflation).
- attention scores and weighted values: 2 matmuls of 2*S*D_attn FLOPs per token per layer in full attention;
  a causal mask halves the useful work, so 6 * L * S * D_attn in total (fwd+bwd) per token, D_attn = H * head_dim.
  Under document masking a token attends only within its document: a window of documents of lengths l_i does
  sum(l_i^2)/2 instead of S^2/2 pairs, so S is replaced by the batch's attention span sum(l_i^2) / S
  (`document_attention_span`), averaged over the windows.
Recomputation is not counted (it is overhead, not model FLOPs), which is what "model FLOPs utilisation" means.
"""
from __future__ import annotations

from typing import Optional

import torch

from nanotronix.config import ModelConfig
from nanotronix.train.gpus import GPUS, gpu_of_device_name


def matmul_params(cfg: ModelConfig) -> int:
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f
    return layers * per_layer + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, attention_span: Optional[float] = None) -> float:
    """attention_span: the keys a token attends to on average, times 2 (None: seq_len, causal attention over
    whole windows; under document masking `document_attention_span` of the batch)."""
    span = seq_len if attention_span is None else attention_span
    attn = 6 * cfg.num_hidden_layers * span * cfg.num_attention_heads * cfg.head_dim
    return 6.0 * matmul_params(cfg) + attn


def document_attention_span(tokens: torch.Tensor, eos_id: int) -> float:
    """sum(l_i^2) / (rows * S) over the documents (lengths l_i) of token windows [..., S]: the attention span of
    `flops_per_token` under document masking (S when no window holds an EOS)."""
    from nanotronix.model.documents import Documents

    windows = tokens.reshape(-1, tokens.shape[-1])
    lengths = Documents.from_tokens(windows, eos_id).lengths.double()
    return float((lengths * lengths).sum()) / windows.shape[0] / windows.shape[1]


def device_peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    """Peak for this device, or None where it is unknown (CPUs, unlisted GPUs): MFU is then reported as null."""
    if torch.device(device).type != "cuda":
        return None
    key = gpu_of_device_name(torch.cuda.get_device_name(device))
    return None if key is None else GPUS[key].peak_tflops[dtype]


def mfu(tokens_per_sec_per_gpu: float, flops_token: float, peak_tflops: Optional[float]) -> Optional[float]:
    if peak_tflops is None:
        return None
    return tokens_per_sec_per_gpu * flops_token / (peak_tflops * 1e12)
