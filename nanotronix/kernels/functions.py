"""Autograd functions around the fused ops: add + RMSNorm, RoPE fused with the QKV split, SwiGLU; and the weight
gradient GEMM that accumulates into an fp32 buffer (`wgrad_accumulate_fp32`).

Each op runs the compiled CUDA kernel (nanotronix._kernels, built from csrc/ by setup.py; probed in accel.py)
when its inputs are on CUDA and the extension is built, and the pure-PyTorch twin in `reference.py` otherwise.
Both implement the same forward and backward formulas, so the same Functions are tested on CPU (twin vs
autograd of the plain model) and on the GPU (kernel vs twin).
"""
from __future__ import annotations

from typing import Optional

import torch

from nanotronix import accel
from nanotronix.kernels import reference

# Widest row the kernels keep in shared memory (3 fp32 rows in the backward must fit in 48 KB).
_MAX_NORM_COLS = 4000


def _impl(t: torch.Tensor, cols: Optional[int] = None, dtypes: tuple = ()):
    """The compiled module when it can take `t` and the other tensors' and outputs' `dtypes` (None: no tensor), else
    the PyTorch twin. The norm's output dtype and delta are not x's: fp16 autocast over an fp32 residual reached the
    kernels, which refuse fp16, instead of the twin."""
    ext = accel.compiled_kernels()
    if ext is None or not t.is_cuda or not {t.dtype, *dtypes} - {None} <= {torch.float32, torch.bfloat16}:
        return reference
    if cols is not None and cols > _MAX_NORM_COLS:
        return reference
    return ext


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What the plain RMSNorm's output feeds the next matmul in: autocast's dtype, else weight * x promoted."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, eps, out_dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        d2 = delta.reshape(-1, shape[-1]).contiguous() if delta is not None else None
        w = reference._f(weight).contiguous()  # the kernels take an fp32 weight (fp64 only in CPU tests)
        impl = _impl(x2, shape[-1], (d2.dtype if d2 is not None else None, out_dtype))
        out, res, rstd = impl.add_rmsnorm_fwd(x2, d2, w, eps, out_dtype)
        saved_res = res if delta is not None else x2
        ctx.save_for_backward(saved_res, rstd, w)
        ctx.has_delta = delta is not None
        ctx.dtypes = (x.dtype, delta.dtype if delta is not None else None, weight.dtype)
        out = out.view(shape)
        if delta is None:
            return out  # the residual is x itself: nothing to return
        return out, res.view(shape)

    @staticmethod
    def backward(ctx, g_out, g_res=None):
        res, rstd, w = ctx.saved_tensors
        x_dtype, delta_dtype, w_dtype = ctx.dtypes
        shape = g_out.shape
        g2 = g_out.reshape(-1, shape[-1]).contiguous()
        gr2 = g_res.reshape(-1, shape[-1]).to(res.dtype).contiguous() if g_res is not None else None
        impl = _impl(g2, shape[-1], (res.dtype, x_dtype, delta_dtype))
        gx, gd, gw = impl.add_rmsnorm_bwd(g2, gr2, res, rstd, w, x_dtype, delta_dtype)
        gx = gx.view(shape)
        return gx, gd.view(shape) if ctx.has_delta else None, gw.to(w_dtype), None, None


def add_rms_norm(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta) * weight, x + delta): the residual add and the next norm in one pass.

    The residual keeps the promoted dtype of x and delta (fp32 under autocast, as in the plain model); the
    normed output is in autocast's dtype when autocast is on (what the following matmul would cast it to).
    """
    return _AddRMSNorm.apply(x, delta, weight, eps, _out_dtype(x, weight))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _AddRMSNorm.apply(x, None, weight, eps, _out_dtype(x, weight))


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin):
        qkv = qkv.contiguous()
        math_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        cos, sin = cos.to(math_dtype).contiguous(), sin.to(math_dtype).contiguous()
        ctx.save_for_backward(cos, sin)
        return tuple(_impl(qkv).rope_qkv_fwd(qkv, cos, sin))

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        gq, gk, gv = (g.contiguous() for g in (gq, gk, gv))
        return _impl(gq).rope_qkv_bwd(gq, gk, gv, cos, sin), None, None


def rope_split_qkv(qkv: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, S, groups, r+2, D] (the fused projection's layout) -> rotated q [B, S, groups*r, D], rotated k
    [B, S, groups, D], v [B, S, groups, D]; rotate-half RoPE computed in fp32 with fp32 cos/sin [S, D]."""
    return _RopeQKV.apply(qkv, cos, sin)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gate_up = gate_up.contiguous()
        ctx.save_for_backward(gate_up)
        return _impl(gate_up).swiglu_fwd(gate_up)

    @staticmethod
    def backward(ctx, grad_out):
        (gate_up,) = ctx.saved_tensors
        return _impl(gate_up).swiglu_bwd(grad_out.contiguous(), gate_up)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate/up interleaved pairwise in the last dim [..., 2F] -> [..., F]."""
    return _SwiGLU.apply(gate_up)


def wgrad_accumulate_fp32(main_grad: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor) -> None:
    """main_grad [out, in] (fp32) += grad_out[tokens, out]^T @ inp[tokens, in], in place.

    On CUDA with bf16/fp16 inputs: one cuBLAS GEMM through torch (`addmm` with out_dtype=float32 into main_grad
    itself, beta 1): products summed in fp32 and added to main_grad in the GEMM's epilogue, so the gradient never
    exists as a low-precision tensor and needs no separate add (reads and writes 8 bytes per element instead of
    writing 2, reading 2 + 4 and writing 4). On CPU, or with other inputs (fp32, or fp64 in tests): the fp32 twin in
    `reference`, the same sums up to their order. A CUDA torch without that GEMM (older than 2.10) gets the
    low-precision GEMM and a separate add rather than an fp32 GEMM at a fraction of the speed
    (train.grad_accumulation_fusion refuses such a torch up front)."""
    low_precision = grad_out.dtype in (torch.bfloat16, torch.float16) and inp.dtype == grad_out.dtype
    if not main_grad.is_cuda or not low_precision:  # cuBLAS's out_dtype GEMM takes fp16/bf16 inputs only (not fp64)
        reference.wgrad_accumulate_fp32(main_grad, grad_out, inp)
    elif accel.fp32_accumulating_gemm():
        torch.addmm(main_grad, grad_out.t(), inp, out_dtype=torch.float32, out=main_grad)
    else:
        main_grad += (grad_out.t() @ inp).to(main_grad.dtype)
