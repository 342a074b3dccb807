"""The compiled csrc/ CUDA kernels against their PyTorch twins and an fp64 reference (forward and backward).

Runs only where CUDA and the built extension (nanotronix._kernels) exist: on the GPU machine after
`python setup.py build_ext --inplace` (tools/gpu_checks.sh). Skips, saying so, everywhere else (CPU CI).
Tolerances (relative L2 error, ||out - ref|| / ||ref||, ref computed in fp64 from the same inputs):
fp32 inputs 1e-5; bf16 inputs 1e-2 (one bf16 rounding of each output is ~4e-3 per element).
Kernel vs twin (same fp32 formulas, different summation order / one rounding): fp32 1e-5, bf16 1e-2.
"""
import pytest
import torch

from nanotronix import accel
from nanotronix.kernels import reference

ext = accel.compiled_kernels()
pytestmark = pytest.mark.skipif(ext is None, reason="needs CUDA and the built nanotronix._kernels extension "
                                                    "(python setup.py build_ext --inplace on a CUDA machine)")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in the output (an element left unwritten?)"
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison_allocator():
    """Fill freed cached blocks with NaN so an output element the kernel forgets to write shows up as NaN: one large
    block, and small ones too (the caching allocator serves requests of up to 1 MiB, most outputs here, from a pool
    of 2 MiB segments of its own, which the large block never was part of)."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    small = [torch.full((64 << 10,), float("nan"), device="cuda") for _ in range(256)]  # 256 KiB each: 64 MiB
    del junk, small


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("cols", [576, 960, 2048, 100])
def test_add_rmsnorm(dtype, with_delta, cols):
    rows = 333
    x = rand(rows, cols, dtype=torch.float32 if with_delta else dtype)  # the residual stream is fp32 in training
    delta = rand(rows, cols, dtype=dtype) if with_delta else None
    w = rand(cols, dtype=torch.float32) * 0.1 + 1
    g = rand(rows, cols, dtype=dtype)
    g_res = rand(rows, cols, dtype=torch.promote_types(x.dtype, dtype)) if with_delta else None
    poison_allocator()
    out, res, rstd = ext.add_rmsnorm_fwd(x, delta, w, 1e-5, dtype)
    t_out, t_res, t_rstd = reference.add_rmsnorm_fwd(x, delta, w, 1e-5, dtype)
    # fp64 reference
    h = x.double() + (delta.double() if with_delta else 0)
    ref_out = w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(out, t_out) < TOL[dtype]
    assert rel_err(rstd, t_rstd) < 1e-5
    if with_delta:
        assert rel_err(res, t_res) < TOL[dtype] and res.dtype == t_res.dtype
    saved = res if with_delta else x
    poison_allocator()
    gx, gd, gw = ext.add_rmsnorm_bwd(g, g_res, saved, rstd, w, x.dtype, delta.dtype if with_delta else None)
    t_gx, t_gd, t_gw = reference.add_rmsnorm_bwd(g, g_res, saved, t_rstd, w, x.dtype,
                                                 delta.dtype if with_delta else None)
    hr = h.clone().requires_grad_(True)
    wr = w.double().clone().requires_grad_(True)
    o = wr * hr * torch.rsqrt(hr.pow(2).mean(-1, keepdim=True) + 1e-5)
    (o * g.double()).sum().backward()
    ref_gh = hr.grad + (g_res.double() if with_delta else 0)
    assert rel_err(gx, ref_gh) < TOL[dtype] and rel_err(gx, t_gx) < TOL[dtype]
    assert rel_err(gw, wr.grad) < TOL[dtype] and rel_err(gw, t_gw) < 1e-4
    if with_delta:
        assert gd.dtype == delta.dtype and rel_err(gd, ref_gh) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,r,dim", [(32, 1, 64), (3, 3, 64), (5, 3, 64), (2, 2, 16)])
def test_rope_qkv(dtype, groups, r, dim):
    b, s = 2, 77
    qkv = rand(b, s, groups, r + 2, dim, dtype=dtype)
    from nanotronix.model.rope import rope_cos_sin
    cos, sin = rope_cos_sin(torch.arange(s, device="cuda"), dim, 10000.0)
    poison_allocator()
    q, k, v = ext.rope_qkv_fwd(qkv, cos, sin)
    tq, tk, tv = reference.rope_qkv_fwd(qkv, cos, sin)
    rq, rk, rv = reference.rope_qkv_fwd(qkv.double(), cos.double(), sin.double())
    for a, t, ref in ((q, tq, rq), (k, tk, rk), (v, tv, rv)):
        assert a.shape == t.shape
        assert rel_err(a, ref) < TOL[dtype] and rel_err(a, t) < TOL[dtype]
    assert torch.equal(v, tv)  # a copy
    gq, gk, gv = rand(*q.shape, dtype=dtype), rand(*k.shape, dtype=dtype), rand(*v.shape, dtype=dtype)
    poison_allocator()
    gqkv = ext.rope_qkv_bwd(gq, gk, gv, cos, sin)
    t_g = reference.rope_qkv_bwd(gq, gk, gv, cos, sin)
    x = qkv.double().requires_grad_(True)
    outs = reference.rope_qkv_fwd(x, cos.double(), sin.double())
    torch.autograd.backward(outs, (gq.double(), gk.double(), gv.double()))
    assert rel_err(gqkv, x.grad) < TOL[dtype] and rel_err(gqkv, t_g) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype):
    gu = rand(3, 129, 2 * 300, dtype=dtype, scale=2.0)
    poison_allocator()
    out = ext.swiglu_fwd(gu)
    ref = reference.swiglu_fwd(gu.double())
    assert rel_err(out, ref) < TOL[dtype] and rel_err(out, reference.swiglu_fwd(gu)) < TOL[dtype]
    go = rand(*out.shape, dtype=dtype)
    poison_allocator()
    g = ext.swiglu_bwd(go, gu)
    x = gu.double().requires_grad_(True)
    reference.swiglu_fwd(x).backward(go.double())
    assert rel_err(g, x.grad) < TOL[dtype] and rel_err(g, reference.swiglu_bwd(go, gu)) < TOL[dtype]


def test_fused_model_matches_plain_on_gpu():
    """A 2-layer SmolLM2-shaped model under bf16 autocast: fused forwards (kernels) vs the plain model."""
    import copy

    from nanotronix.config import PRESETS, ModelConfig
    from nanotronix.model import build_model, cross_entropy
    from nanotronix.parallel.speedups import apply_fused_kernels

    cfg = ModelConfig(**dict(PRESETS["smollm2-135m"], num_hidden_layers=2, vocab_size=1024))
    torch.manual_seed(0)
    plain = build_model(cfg, "sdpa", torch.device("cuda"))
    fused = apply_fused_kernels(copy.deepcopy(plain))
    ids = torch.randint(0, cfg.vocab_size, (2, 257), device="cuda")
    losses, grads = [], []
    for model in (plain, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = cross_entropy(logits, ids[:, 1:])
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) < 2e-3 * abs(losses[0])
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < 3e-2, name
