"""The fused ops' PyTorch twins (nanotronix/kernels/reference.py) and fused layers, on CPU.

The twins carry hand-derived backward formulas (the same ones the CUDA kernels implement); here they are checked
against autograd of the plain math in fp64, and the fused model against the plain model (forward and every
gradient). The CUDA kernels themselves are checked against these twins in tests/test_kernels_cuda.py on a GPU.
Costs ~3 s.
"""
import copy

import pytest
import torch

from nanotronix.config import ModelConfig
from nanotronix.kernels import add_rms_norm, rms_norm, rope_split_qkv, swiglu
from nanotronix.model import build_model, cross_entropy
from nanotronix.model.rope import apply_rope, rope_cos_sin
from nanotronix.parallel.speedups import apply_fused_kernels

D64 = torch.float64


def test_add_rms_norm_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 48, dtype=D64, requires_grad=True)
    delta = torch.randn(5, 7, 48, dtype=D64, requires_grad=True)
    w = (torch.randn(48, dtype=D64) * 0.1 + 1).requires_grad_(True)
    g_out, g_res = torch.randn(5, 7, 48, dtype=D64), torch.randn(5, 7, 48, dtype=D64)
    out, res = add_rms_norm(x, delta, w, 1e-5)
    torch.autograd.backward((out, res), (g_out, g_res))
    grads = [t.grad.clone() for t in (x, delta, w)]
    for t in (x, delta, w):
        t.grad = None
    h = x + delta
    ref = w * torch.nn.functional.rms_norm(h, (48,), eps=1e-5)
    torch.autograd.backward((ref, h), (g_out, g_res))
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(res, h)
    for got, t in zip(grads, (x, delta, w)):
        assert torch.allclose(got, t.grad, atol=1e-10)


def test_rms_norm_without_delta_matches_autograd():
    x = torch.randn(9, 20, dtype=D64, requires_grad=True)
    w = torch.randn(20, dtype=D64, requires_grad=True)
    g = torch.randn(9, 20, dtype=D64)
    rms_norm(x, w, 1e-6).backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (w * torch.nn.functional.rms_norm(x, (20,), eps=1e-6)).backward(g)
    assert torch.allclose(gx, x.grad, atol=1e-10) and torch.allclose(gw, w.grad, atol=1e-10)


@pytest.mark.parametrize("groups,r", [(3, 3), (4, 1), (1, 2)])
def test_rope_split_qkv_matches_plain_rope(groups, r):
    b, s, d = 2, 11, 16
    qkv = torch.randn(b, s, groups, r + 2, d, dtype=D64, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(s), d, 500.0)
    q, k, v = rope_split_qkv(qkv, cos, sin)
    gq, gk, gv = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
    torch.autograd.backward((q, k, v), (gq, gk, gv))
    got = qkv.grad.clone()
    qkv.grad = None
    # the plain attention's path: slice, [B, H, S, D], rotate-half RoPE
    rq = apply_rope(qkv[:, :, :, :r].reshape(b, s, -1, d).transpose(1, 2), cos.double(), sin.double())
    rk = apply_rope(qkv[:, :, :, r].transpose(1, 2), cos.double(), sin.double())
    rv = qkv[:, :, :, r + 1]
    assert torch.allclose(q.transpose(1, 2), rq) and torch.allclose(k.transpose(1, 2), rk) and torch.equal(v, rv)
    torch.autograd.backward((rq, rk, rv), (gq.transpose(1, 2), gk.transpose(1, 2), gv))
    assert torch.allclose(got, qkv.grad, atol=1e-12)


def test_swiglu_matches_autograd():
    gu = (torch.randn(3, 5, 2 * 13, dtype=D64) * 3).requires_grad_(True)
    g = torch.randn(3, 5, 13, dtype=D64)
    swiglu(gu).backward(g)
    got = gu.grad.clone()
    gu.grad = None
    pair = gu.unflatten(-1, (-1, 2))
    ref = torch.nn.functional.silu(pair[..., 0]) * pair[..., 1]
    ref.backward(g)
    assert torch.allclose(swiglu(gu.detach()), ref.detach()) and torch.allclose(got, gu.grad, atol=1e-12)


SHAPES = {
    "gqa-9h-3kv": ModelConfig(hidden_size=72, intermediate_size=100, num_hidden_layers=2, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=301, max_position_embeddings=64, rope_theta=500.0,
                              rms_norm_eps=1e-6, tie_word_embeddings=True, init_std=0.05),
    "mha-untied": ModelConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                              num_key_value_heads=6, vocab_size=97, max_position_embeddings=32, rope_theta=10000.0,
                              rms_norm_eps=1e-5, tie_word_embeddings=False, init_std=0.1),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_fused_model_matches_plain_model(name):
    cfg = SHAPES[name]
    torch.manual_seed(0)
    plain = build_model(cfg, "sdpa")
    fused = apply_fused_kernels(copy.deepcopy(plain))
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert type(fused.layers["0"]).__name__ == "FusedDecoderLayer"
    ids = torch.randint(0, cfg.vocab_size, (2, 25))
    results = []
    for model in (plain, fused):
        logits = model(ids[:, :-1])
        loss = cross_entropy(logits, ids[:, 1:])
        loss.backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for n, g in results[0][1].items():
        assert torch.allclose(results[1][1][n], g, atol=1e-6, rtol=1e-4), n


def test_the_norm_takes_the_twin_for_a_dtype_the_kernels_refuse(monkeypatch):
    """The kernels take fp32 and bf16 only, and the dispatch looked at x alone: fp16 autocast over an fp32 residual
    (an fp16 output), or an fp16 delta, reached the kernel, which refused it. Each dtype the call involves counts."""
    import types

    from nanotronix import accel
    from nanotronix.kernels import functions, reference

    ext = object()
    monkeypatch.setattr(accel, "compiled_kernels", lambda: ext)
    x = types.SimpleNamespace(is_cuda=True, dtype=torch.float32)  # as on a GPU: only these two are read
    assert functions._impl(x, 64, (None, torch.bfloat16)) is ext
    assert functions._impl(x, 64, (None, torch.float16)) is reference
    assert functions._impl(x, 64, (torch.float16, torch.float32)) is reference
    assert functions._impl(x, functions._MAX_NORM_COLS + 1) is reference


def test_the_start_line_says_which_fused_kernels_run(monkeypatch):
    """train.fused_kernels on a GPU without the built extension runs the PyTorch twins: the start-up line says so
    (it said nothing, and such a run looked like one on the kernels)."""
    from nanotronix import accel
    assert accel.fused_kernels_in_use(torch.device("cpu")) == "PyTorch twins (the csrc kernels are CUDA's; device cpu)"
    monkeypatch.setattr(accel, "compiled_kernels", lambda: None)
    assert "not built: python setup.py build_ext --inplace" in accel.fused_kernels_in_use(torch.device("cuda"))
    monkeypatch.setattr(accel, "compiled_kernels", lambda: object())
    assert accel.fused_kernels_in_use(torch.device("cuda")) == "csrc CUDA kernels"
