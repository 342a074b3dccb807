"""The one place that imports optional accelerators.

flash-attn, NVIDIA DALI and the compiled csrc kernels are absent on many machines (CPU CI, the H100 test
machine). Each is probed here once (apex is not used: torch's fused AdamW and the csrc kernels do its work);
everything else asks this module which implementation to use, and every accelerated path has a plain PyTorch twin
that the CPU tests cover.
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


@functools.lru_cache(maxsize=None)
def fp32_accumulating_gemm() -> bool:
    """Whether torch here adds a bf16 GEMM's product into an fp32 tensor in place on CUDA, in one cuBLAS call
    (`torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`: beta 1, fp32 C; accepted with an fp32 `acc`
    since torch 2.10). Probed once on a 2x2 product; False without CUDA."""
    if not torch.cuda.is_available():
        return False
    try:
        acc = torch.ones(2, 2, device="cuda")
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return acc.dtype == torch.float32 and bool((acc == 3).all())
    except (RuntimeError, TypeError):  # an older torch: no such overload, or an fp32 `acc` refused
        return False


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
# attention backends: q [B, H, S, D], k/v [B, KV, S, D]; causal, or within documents when `documents` (a
# nanotronix.model.documents.Documents) is given; return [B, H, S, D]


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KV heads repeated to one per query head (grouped-query attention for kernels without enable_gqa)."""
    rep = q.shape[1] // k.shape[1]
    return (k, v) if rep == 1 else (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents=None) -> torch.Tensor:
    if documents is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    # A boolean mask rules out the FlashAttention kernel; KV heads are expanded so that the memory-efficient
    # kernel (which has no enable_gqa) qualifies instead of the math fallback.
    k, v = _expand_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=documents.attention_mask)


def _sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents=None) -> torch.Tensor:
    """SDPA restricted to cuDNN's fused attention (faster than torch's built-in FlashAttention-2 on Hopper).
    KV heads are expanded for grouped-query attention: enable_gqa is not supported by every cuDNN path.
    With document masking it is plain `sdpa` with a mask (cuDNN's path takes no mask here); the start-up line says
    so (`describe`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if documents is not None:
        return _sdpa(q, k, v, documents)
    k, v = _expand_kv(q, k, v)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents=None) -> torch.Tensor:
    """Reference path: materialised scores, softmax in fp32 (what transformers' eager attention does)."""
    k, v = _expand_kv(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = q.shape[-2]
    allowed = documents.attention_mask if documents is not None else \
        torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents=None) -> torch.Tensor:
    """flash_attn_func; with documents, flash_attn_varlen_func over the flattened tokens with one sequence per
    document (`cu_seqlens`), so no mask is built and no work is spent across document boundaries."""
    flash_attn = _optional_module("flash_attn")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, S, heads, D]
    if documents is None:
        return flash_attn.flash_attn_func(q, k, v, causal=True).transpose(1, 2)
    b, s = q.shape[:2]
    cu, longest = documents.cu_seqlens
    out = flash_attn.flash_attn_varlen_func(q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]),
                                            v.reshape(b * s, *v.shape[2:]), cu, cu, longest, longest, causal=True)
    return out.view(b, s, *out.shape[1:]).transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    # FlexAttention runs its generated kernel only when compiled (eager it is a slow reference)
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def _causal_block_mask(seq: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(lambda b, h, q, k: k <= q, None, None, seq, seq, device=device)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents=None) -> torch.Tensor:
    """FlexAttention with a block mask: causal, or within documents, where blocks across documents are skipped
    rather than masked (the masked SDPA path computes them all). Training needs CUDA: torch has no CPU backward."""
    block_mask = documents.block_mask if documents is not None else _causal_block_mask(q.shape[-2], q.device)
    if torch.compiler.is_compiling():  # inside a compiled layer: traced into the layer's graph as it is
        from torch.nn.attention.flex_attention import flex_attention
        attend = flex_attention
    else:
        attend = _compiled_flex_attention()
    return attend(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _sdpa, "sdpa_cudnn": _sdpa_cudnn, "eager": _eager, "flash_attention_2": _flash, "flex": _flex,
}


# Backends whose kernels take fp16/bf16 only (flash-attn's and cuDNN's): an fp32 run (train.dtype) cannot use them.
HALF_PRECISION_ONLY = ("flash_attention_2", "sdpa_cudnn")


def resolve_attention(requested: str, device: Optional[torch.device], dtype: str) -> str:
    """Map `model.attn_implementation` to a backend name for a run in `dtype` (train.dtype); raise a clear error if
    it cannot run here."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if requested == "auto":
        return "flash_attention_2" if on_cuda and flash_attn_available() and dtype == "bfloat16" else "sdpa"
    if requested in HALF_PRECISION_ONLY and dtype != "bfloat16":
        raise UserError(f"model.attn_implementation: {requested} runs in bf16 only, not train.dtype={dtype} "
                        "(use sdpa)")
    if requested == "flash_attention_2" and not (on_cuda and flash_attn_available()):
        raise UserError("model.attn_implementation: flash_attention_2 needs the flash_attn package and CUDA")
    if requested == "flex" and not on_cuda:
        raise UserError("model.attn_implementation: flex needs CUDA (torch's FlexAttention has no CPU backward)")
    if requested == "sdpa_cudnn" and not (on_cuda and torch.backends.cudnn.is_available()):
        raise UserError("model.attn_implementation: sdpa_cudnn needs CUDA with cuDNN")
    if requested not in ATTENTION_BACKENDS:
        raise UserError(f"model.attn_implementation: unknown backend {requested!r}")
    return requested


def fused_kernels_in_use(device: torch.device) -> str:
    """What train.fused_kernels runs on `device`, for the start-up line: the csrc kernels, or their PyTorch twins
    and why (without the line a run on a GPU whose extension was never built looked the same as one with it)."""
    if device.type != "cuda":
        return f"PyTorch twins (the csrc kernels are CUDA's; device {device.type})"
    if compiled_kernels() is None:
        return "PyTorch twins (csrc kernels not built: python setup.py build_ext --inplace)"
    return "csrc CUDA kernels"


def describe(attention: str, document_masking: bool = False) -> str:
    """One start-up line saying what runs and why (e.g. 'attention: sdpa (flash-attn not installed)')."""
    why = ""
    if attention == "sdpa_cudnn" and document_masking:
        why = " (masked: plain sdpa with a mask)"
    elif attention != "flash_attention_2":
        why = " (flash-attn not installed)" if _optional_module("flash_attn") is None else ""
    optim = "torch AdamW (fused on CUDA)"
    return f"attention: {attention}{why}; optimizer: {optim}"
