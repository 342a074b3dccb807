"""The fused ops' PyTorch twins (nanotronix/kernels/reference.py, functions.py, layers.py) at their edges, cases that
mutation testing showed no CPU test held; each test is against something the twins do not share code with.

- bf16 inputs: the twins promise "all math is fp32" and outputs in the input's dtype (the kernels' signatures,
  csrc/bindings.cpp), i.e. the fp64 result rounded once to bf16. test_kernels.py runs the twins in fp64 only, and
  the bf16 property test compares whole layers with a tolerance of several bf16 roundings, so cos/sin rounded to
  bf16 before the rotation, or an output left in fp32, went unnoticed.
- the norm's output dtype without autocast (weight * x promoted, as model/norm.RMSNorm gives);
- fp64 cos/sin: the fp64 path the tests check the formulas with must not round cos/sin to fp32;
- the fused attention refuses document masking when called directly (it would attend across documents);
- the widest norm row sent to the kernels fits the backward's shared memory (csrc/fused_ops.cu).
Costs < 0.1 s (plus the imports).
"""
import copy

import pytest
import torch

from nanotronix.config import ModelConfig
from nanotronix.kernels import rms_norm, rope_split_qkv, swiglu
from nanotronix.model import build_model
from nanotronix.model.documents import Documents
from nanotronix.model.norm import RMSNorm
from nanotronix.model.rope import apply_rope, rope_cos_sin
from nanotronix.parallel.speedups import apply_fused_kernels

BF16 = torch.bfloat16


def _assert_rounded_once(got: torch.Tensor, exact: torch.Tensor, terms: torch.Tensor, what: str):
    """got (bf16) is exact (fp64) rounded once to bf16, after fp32 math: within half a bf16 spacing of exact (2^-8
    of its binade's lower end: bf16 keeps 8 significant bits), plus fp32 rounding of the terms summed (`terms`,
    the sum of their magnitudes), which can tip a value sitting on a rounding midpoint to the other neighbour."""
    assert got.dtype == BF16, f"{what}: {got.dtype}"
    _, e = torch.frexp(exact)  # exact = m * 2^e, 0.5 <= |m| < 1: binade [2^(e-1), 2^e), bf16 spacing 2^(e-8)
    half_spacing = torch.ldexp(torch.ones_like(exact), e - 9)
    err = (got.double() - exact).abs()
    bound = half_spacing + 2.0 ** -20 * terms + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g}x the one-rounding bound"


def test_rope_split_qkv_in_bf16_is_fp32_math_rounded_once():
    """bf16 qkv (the fused projection's output under autocast): q and k are the exact rotation (fp64, model/rope's
    apply_rope with the fp32 cos/sin upcast) rounded once to bf16, v is qkv's slice untouched; the gradient of qkv
    likewise (the exact transpose of the rotation of the bf16 upstream gradients, rounded once)."""
    torch.manual_seed(0)
    b, s, groups, r, d = 2, 37, 3, 2, 32
    qkv = (torch.randn(b, s, groups, r + 2, d) * 3).to(BF16).requires_grad_(True)
    cos, sin = rope_cos_sin(torch.arange(s), d, 10000.0)
    q, k, v = rope_split_qkv(qkv, cos, sin)
    gq, gk, gv = (torch.randn_like(t, dtype=torch.float32).to(BF16) for t in (q, k, v))
    torch.autograd.backward((q, k, v), (gq, gk, gv))

    x = qkv.detach().double().requires_grad_(True)
    c, sn = cos.double(), sin.double()
    rq = apply_rope(x[:, :, :, :r].reshape(b, s, groups * r, d).transpose(1, 2), c, sn).transpose(1, 2)
    rk = apply_rope(x[:, :, :, r].transpose(1, 2), c, sn).transpose(1, 2)
    ax = x.detach().abs()  # |x1 c| + |x2 s| <= |x1| + |x2| bounds each output's terms
    mag = ax + torch.cat(ax.chunk(2, -1)[::-1], -1)
    _assert_rounded_once(q, rq.detach(), mag[:, :, :, :r].reshape(b, s, groups * r, d), "q")
    _assert_rounded_once(k, rk.detach(), mag[:, :, :, r], "k")
    assert v.dtype == BF16 and torch.equal(v, qkv.detach()[:, :, :, r + 1])
    torch.autograd.backward((rq, rk), (gq.double(), gk.double()))
    want = x.grad.clone()
    want[:, :, :, r + 1] = gv.double()
    gmag = torch.cat((gq.reshape(b, s, groups, r, d), gk[:, :, :, None], gv[:, :, :, None]), 3).double().abs()
    _assert_rounded_once(qkv.grad, want, gmag + torch.cat(gmag.chunk(2, -1)[::-1], -1), "qkv gradient")


def test_swiglu_in_bf16_is_fp32_math_rounded_once():
    """bf16 gate/up pairs: silu(gate) * up computed exactly (fp64, torch.nn.functional.silu) rounded once to bf16,
    and its gradient (fp64 autograd of the same) likewise."""
    torch.manual_seed(1)
    gu = (torch.randn(4, 9, 2 * 40) * 3).to(BF16).requires_grad_(True)
    out = swiglu(gu)
    g = torch.randn(out.shape).to(BF16)
    out.backward(g)
    x = gu.detach().double().requires_grad_(True)
    pair = x.unflatten(-1, (-1, 2))
    want = torch.nn.functional.silu(pair[..., 0]) * pair[..., 1]
    want.backward(g.double())
    _assert_rounded_once(out, want.detach(), want.detach().abs(), "swiglu output")
    # each gradient is one product of the upstream gradient and smooth factors: no cancellation
    _assert_rounded_once(gu.grad, x.grad, x.grad.abs(), "swiglu gradient")


def test_rms_norm_output_dtype_is_the_plain_norms_without_autocast():
    """Without autocast the plain RMSNorm's output is weight * normed promoted (fp32 for a bf16 x and an fp32
    gain, as the fp32 master weights are): the fused norm's is the same, with the same values up to the plain
    norm's bf16 rounding of the normalised x."""
    torch.manual_seed(2)
    x = torch.randn(3, 5, 24).to(BF16)
    norm = RMSNorm(24, 1e-5)
    norm.weight.data.normal_(1.0, 0.3)
    want = norm(x)
    got = rms_norm(x, norm.weight, 1e-5)
    assert want.dtype == torch.float32 and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=2.0 ** -7, atol=1e-6)


def test_rope_split_qkv_fp64_keeps_fp64_cos_sin():
    """fp64 qkv with fp64 cos/sin (how the CPU tests check the formulas exactly): the rotation is model/rope's in
    fp64 to 1e-12, cos/sin not rounded to fp32 on the way (that is a 1e-8 error)."""
    torch.manual_seed(3)
    b, s, d = 1, 13, 16
    qkv = torch.randn(b, s, 2, 3, d, dtype=torch.float64)
    pos = torch.arange(s, dtype=torch.float64) * 0.7315  # off the fp32 grid: cos/sin not fp32-representable
    inv = 1.0 / (500.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    cos, sin = emb.cos(), emb.sin()
    q, k, _ = rope_split_qkv(qkv, cos, sin)
    rq = apply_rope(qkv[:, :, :, :1].reshape(b, s, 2, d).transpose(1, 2), cos, sin).transpose(1, 2)
    rk = apply_rope(qkv[:, :, :, 1].transpose(1, 2), cos, sin).transpose(1, 2)
    assert torch.allclose(q, rq, atol=1e-12, rtol=0) and torch.allclose(k, rk, atol=1e-12, rtol=0)


def test_fused_attention_refuses_document_masking():
    """Called directly with documents (config validation keeps the trainer from it), the fused attention must
    refuse rather than run causal attention across the documents' boundaries."""
    cfg = ModelConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=16, max_position_embeddings=16, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, init_std=0.1)
    torch.manual_seed(4)
    layer = apply_fused_kernels(copy.deepcopy(build_model(cfg).layers["0"]))
    ids = torch.tensor([[1, 2, 5, 3, 4, 5, 6, 7]])
    documents = Documents.from_tokens(ids, 5)
    cos, sin = rope_cos_sin(torch.arange(8), cfg.head_dim, cfg.rope_theta)
    with pytest.raises(NotImplementedError, match="document masking"):
        layer(torch.randn(1, 8, 32), cos, sin, documents)


def test_widest_norm_row_for_the_kernels_fits_their_shared_memory(monkeypatch):
    """csrc/fused_ops.cu's norm backward keeps (3 * cols + 32) fp32 values of a row in shared memory, 48 KB at most
    without an opt-in: the widest row dispatched to the kernels must fit, and that row itself goes to the kernels."""
    from nanotronix import accel
    from nanotronix.kernels import functions, reference
    assert (3 * functions._MAX_NORM_COLS + 32) * 4 <= 48 * 1024
    ext = object()
    monkeypatch.setattr(accel, "compiled_kernels", lambda: ext)

    class OnGpu:
        is_cuda, dtype = True, torch.float32
    assert functions._impl(OnGpu(), functions._MAX_NORM_COLS) is ext
    assert functions._impl(OnGpu(), functions._MAX_NORM_COLS + 1) is reference
