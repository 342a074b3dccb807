"""Pure-PyTorch twins of the csrc/ kernels: the same forward AND backward formulas, written with torch ops.

They are what `nanotronix.kernels` runs on CPU (and on CUDA when the extension is not built), so the CPU tests
check the hand-derived backward formulas against autograd, and the GPU tests check the CUDA kernels against
these. Signatures mirror nanotronix._kernels (csrc/bindings.cpp) exactly; all math is fp32.
"""
from __future__ import annotations

from typing import Optional

import torch


def _f(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the math dtype: fp32, or fp64 for fp64 inputs (so tests can check the formulas exactly)."""
    return t if t.dtype == torch.float64 else t.float()


def add_rmsnorm_fwd(x: torch.Tensor, delta: Optional[torch.Tensor], w: torch.Tensor, eps: float,
                    out_dtype: torch.dtype) -> list[torch.Tensor]:
    """x, delta [rows, cols]; w [cols] fp32 -> (out, residual or empty, rstd [rows] fp32)."""
    if delta is not None:
        res = (_f(x) + _f(delta)).to(torch.promote_types(x.dtype, delta.dtype))
        h = _f(res)
    else:
        res = torch.empty(0, device=x.device)
        h = _f(x)
    rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)
    out = (w * (h * rstd[:, None])).to(out_dtype)
    return [out, res, rstd]


def add_rmsnorm_bwd(g: torch.Tensor, g_res: Optional[torch.Tensor], res: torch.Tensor, rstd: torch.Tensor,
                    w: torch.Tensor, x_dtype: torch.dtype, delta_dtype: Optional[torch.dtype]) -> list[torch.Tensor]:
    """-> (grad x, grad delta or empty, grad w fp32)."""
    xhat = _f(res) * rstd[:, None]
    gw = _f(g) * w
    gh = rstd[:, None] * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    if g_res is not None:
        gh = gh + _f(g_res)
    gd = gh.to(delta_dtype) if delta_dtype is not None else torch.empty(0, device=g.device)
    return [gh.to(x_dtype), gd, (_f(g) * xhat).sum(0)]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    c1, c2 = cos.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)


def _rotate_back(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of `_rotate` (its backward)."""
    g1, g2 = g.chunk(2, dim=-1)
    c1, c2 = cos.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((g1 * c1 + g2 * s2, g2 * c2 - g1 * s1), dim=-1)


def rope_qkv_fwd(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
    """qkv [B, S, groups, r+2, D]; cos/sin [S, D] fp32 -> q [B, S, groups*r, D], k, v [B, S, groups, D]."""
    b, s, groups, slots, d = qkv.shape
    r = slots - 2
    c, sn = cos[None, :, None, None, :], sin[None, :, None, None, :]
    rotated = _rotate(_f(qkv[:, :, :, :r + 1]), c, sn).to(qkv.dtype)
    q = rotated[:, :, :, :r].reshape(b, s, groups * r, d)
    return [q, rotated[:, :, :, r].contiguous(), qkv[:, :, :, r + 1].contiguous()]


def rope_qkv_bwd(gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    b, s, groups, d = gk.shape
    r = gq.shape[2] // groups
    g = _f(torch.cat((gq.reshape(b, s, groups, r, d), gk[:, :, :, None]), dim=3))
    c, sn = cos[None, :, None, None, :], sin[None, :, None, None, :]
    return torch.cat((_rotate_back(g, c, sn).to(gq.dtype), gv[:, :, :, None]), dim=3)


def swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] (gate/up interleaved pairwise) -> silu(gate) * up [..., F]."""
    gu = _f(gate_up.unflatten(-1, (-1, 2)))
    return (torch.nn.functional.silu(gu[..., 0]) * gu[..., 1]).to(gate_up.dtype)


def swiglu_bwd(grad_out: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    gu = _f(gate_up.unflatten(-1, (-1, 2)))
    gate, up = gu[..., 0], gu[..., 1]
    go = _f(grad_out)
    sig = torch.sigmoid(gate)
    d_gate = go * up * sig * (1 + gate * (1 - sig))
    d_up = go * gate * sig
    return torch.stack((d_gate, d_up), dim=-1).flatten(-2).to(gate_up.dtype)


def wgrad_accumulate_fp32(main_grad: torch.Tensor, grad_out: torch.Tensor, inp: torch.Tensor) -> None:
    """main_grad [out, in] += grad_out[tokens, out]^T @ inp[tokens, in] with products and sums in main_grad's dtype
    (fp32): the bf16 inputs are exact in fp32, so this is the CUDA GEMM's result (`functions.wgrad_accumulate_fp32`)
    up to summation order."""
    main_grad.addmm_(grad_out.t().to(main_grad.dtype), inp.to(main_grad.dtype))
