"""The one place that imports optional accelerators.

flash-attn, apex, NVIDIA DALI and the compiled csrc kernels are absent on many machines (CPU CI, the H100 test
machine). Each is probed here once; everything else asks this module which implementation to use, and every
accelerated path has a plain PyTorch twin that the CPU tests cover.
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nanotronix.errors import UserError


@functools.lru_cache(maxsize=None)
def _optional_module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken binary wheel raising anything at import
        return None


def flash_attn_available() -> bool:
    return _optional_module("flash_attn") is not None and torch.cuda.is_available()


def compiled_kernels():
    """The csrc/ CUDA extension (nanotronix._kernels) when it is built and CUDA is usable, else None."""
    if not torch.cuda.is_available():
        return None
    return _optional_module("nanotronix._kernels")


def dali_modules():
    """NVIDIA DALI's pipeline API and PyTorch iterator as a namespace (pipeline_def, fn, types,
    DALIGenericIterator, version) when DALI is installed, else None (data.loader: pytorch needs none of it)."""
    dali = _optional_module("nvidia.dali")
    plugin = _optional_module("nvidia.dali.plugin.pytorch")
    if dali is None or plugin is None:
        return None
    from types import SimpleNamespace
    return SimpleNamespace(pipeline_def=dali.pipeline_def, fn=dali.fn, types=dali.types,
                           DALIGenericIterator=plugin.DALIGenericIterator, version=dali.__version__)


# --------------------------------------------------------------------------------------------------
# attention backends: q [B, H, S, D], k/v [B, KV, S, D], causal; return [B, H, S, D]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def _sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA restricted to cuDNN's fused attention (faster than torch's built-in FlashAttention-2 on Hopper).
    KV heads are expanded for grouped-query attention: enable_gqa is not supported by every cuDNN path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference path: materialised scores, softmax in fp32 (what transformers' eager attention does)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = q.shape[-2]
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    flash_attn = _optional_module("flash_attn")
    out = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return out.transpose(1, 2)


ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _sdpa, "sdpa_cudnn": _sdpa_cudnn, "eager": _eager, "flash_attention_2": _flash,
}


def resolve_attention(requested: str, device: Optional[torch.device] = None) -> str:
    """Map `model.attn_implementation` to a backend name; raise a clear error if it cannot run here."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if requested == "auto":
        return "flash_attention_2" if on_cuda and flash_attn_available() else "sdpa"
    if requested == "flash_attention_2" and not (on_cuda and flash_attn_available()):
        raise UserError("model.attn_implementation: flash_attention_2 needs the flash_attn package and CUDA")
    if requested == "sdpa_cudnn" and not (on_cuda and torch.backends.cudnn.is_available()):
        raise UserError("model.attn_implementation: sdpa_cudnn needs CUDA with cuDNN")
    if requested not in ATTENTION_BACKENDS:
        raise UserError(f"model.attn_implementation: unknown backend {requested!r}")
    return requested


def describe(attention: str) -> str:
    """One start-up line saying what runs and why (e.g. 'attention: sdpa (flash-attn not installed)')."""
    why = ""
    if attention != "flash_attention_2":
        why = " (flash-attn not installed)" if _optional_module("flash_attn") is None else ""
    optim = "torch AdamW (fused on CUDA)"
    return f"attention: {attention}{why}; optimizer: {optim}"
