"""Speed switches against the plain path on CPU (forward + gradients): recompute (selective, full), torch.compile
(traced by dynamo + AOTAutograd with the aot_eager backend; Inductor, with and without GEMM autotuning, in the trainer
path and the loss chunks), the fused head + chunked cross entropy, and their config validation. Costs ~25 s.
"""
import copy
import math
import re

import pytest
import torch

from helpers import requires_cuda
from live_storages import LiveStorages
from nanotronix.config import ConfigError, ModelConfig, config_from_dict
from nanotronix.model import build_model, cross_entropy
from nanotronix.model.loss import InputCollectives, linear_cross_entropy
from nanotronix.parallel.speedups import apply_compile, apply_recompute

CFG = ModelConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=131, max_position_embeddings=32, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, init_std=0.05)


def loss_and_grads(model, ids):
    loss = cross_entropy(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, atol=1e-6):
    assert abs(a[0] - b[0]) < atol
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.allclose(a[1][name], b[1][name], atol=atol, rtol=1e-4), name


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_matches_plain(mode):
    torch.manual_seed(0)
    plain = build_model(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 17))
    ref = loss_and_grads(plain, ids)
    model = apply_recompute(copy.deepcopy(plain), mode)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert_same(loss_and_grads(model, ids), ref)


@pytest.fixture()
def flash_attn_stand_in(monkeypatch):
    """flash-attn >= 2.6's forward kernel as its custom op `flash_attn::_flash_attn_forward` (SDPA inside, its calls
    counted) behind a stand-in `flash_attn.flash_attn_func`, as the model's flash_attention_2 backend calls it; the
    op's library is removed afterwards. Yields the list of calls."""
    import types
    import torch.nn.functional as F
    from nanotronix import accel

    def attention(q, k, v):  # [B, S, heads, D] as flash-attn takes them
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous()

    calls = []
    lib = torch.library.Library("flash_attn", "FRAGMENT")
    lib.define("_flash_attn_forward(Tensor q, Tensor k, Tensor v) -> Tensor")
    lib.impl("_flash_attn_forward", lambda q, k, v: calls.append(1) or attention(q, k, v), "CPU")

    def backward(ctx, grad):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            return torch.autograd.grad(attention(*inputs), inputs, grad)

    torch.library.register_autograd("flash_attn::_flash_attn_forward", backward,
                                    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs), lib=lib)
    fake = types.SimpleNamespace(flash_attn_func=lambda q, k, v, causal: torch.ops.flash_attn._flash_attn_forward(
        q, k, v))
    monkeypatch.setattr(accel, "_optional_module", lambda name: fake if name == "flash_attn" else None)
    yield calls
    lib._destroy()


def test_selective_recompute_keeps_flash_attentions_output(flash_attn_stand_in):
    """Selective recompute keeps what matmuls and attention made: flash-attn's forward (a custom op named
    flash_attn::...) was not in its list, so every layer ran it again in the backward. Same gradients as no
    recompute, and one attention forward per layer."""
    torch.manual_seed(0)
    plain = build_model(CFG, "flash_attention_2")
    ids = torch.randint(0, CFG.vocab_size, (2, 17))
    ref = loss_and_grads(plain, ids)
    assert len(flash_attn_stand_in) == CFG.num_hidden_layers  # the stand-in runs (once per layer)
    flash_attn_stand_in.clear()
    assert_same(loss_and_grads(apply_recompute(copy.deepcopy(plain), "selective"), ids), ref)
    assert len(flash_attn_stand_in) == CFG.num_hidden_layers


def test_compile_matches_plain():
    torch.manual_seed(0)
    plain = build_model(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 17))
    ref = loss_and_grads(plain, ids)
    model = apply_compile(copy.deepcopy(plain), backend="aot_eager")
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert_same(loss_and_grads(model, ids), ref, atol=1e-5)


@pytest.mark.parametrize("ignored", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_linear_cross_entropy_matches_full_logits(chunk, ignored):
    """Labels at -100 (a share `ignored` of them) add no loss and no gradient, as in F.cross_entropy; with every
    label ignored both give a nan loss and zero gradients."""
    torch.manual_seed(0)
    h = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 21)).masked_fill(torch.rand(3, 21) < ignored, -100)
    g = torch.tensor(0.7, dtype=torch.float64)
    out = linear_cross_entropy(h, w, y, chunk)
    out.backward(g)
    got = (out.item(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    logits = torch.nn.functional.linear(h, w)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    ref.backward(g)
    if ignored == 1.0:
        assert math.isnan(got[0]) and math.isnan(ref.item())
    else:
        # logits and the loss are made in fp32, as in the plain loss: a few of its units (2^-23, relative)
        assert abs(got[0] - ref.item()) < 1e-6 * (1 + abs(ref.item()))
    assert torch.allclose(got[1], h.grad, atol=1e-7) and torch.allclose(got[2], w.grad, atol=1e-7)


def test_linear_cross_entropy_computes_no_gradients_under_no_grad():
    """Validation runs the fused loss under torch.no_grad() with weights that require grad: the same loss, and no
    chunk computes the gradients it would throw away (a [vocab, hidden] fp32 buffer and two GEMMs per chunk)."""
    from nanotronix.model.loss import _chunk_loss_and_grads

    torch.manual_seed(0)
    h, w = torch.randn(40, 16), torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (40,))
    asked = []

    def chunk_fn(h, w, labels, row_scale, want_grads):
        asked.append(want_grads)
        return _chunk_loss_and_grads(h, w, labels, row_scale, want_grads)

    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, 16, chunk_fn=chunk_fn)
    assert asked == [False] * 3
    assert loss.item() == pytest.approx(cross_entropy(torch.nn.functional.linear(h, w.detach()), y).item(), rel=1e-6)
    linear_cross_entropy(h, w, y, 16, chunk_fn=chunk_fn).backward()
    assert asked[3:] == [True] * 3 and w.grad is not None


def test_linear_cross_entropy_bf16_close_to_plain_autocast_head():
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(97, 32) * 0.2).requires_grad_(True)
    y = torch.randint(0, 97, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = cross_entropy(torch.nn.functional.linear(h, w), y)
        out = linear_cross_entropy(h, w, y, 10)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out.backward()
    assert w.grad.dtype == torch.float32
    assert abs(out.item() - ref.item()) < 1e-2
    assert (h.grad - gh).norm() / gh.norm() < 2e-2 and (w.grad - gw).norm() / gw.norm() < 2e-2


def test_linear_cross_entropy_gathers_in_bf16_keeps_bf16_and_reduces_in_fp32():
    """The vocab-parallel fused loss's input collectives (sequence parallelism: gather, reduce-scatter), stood in for
    by two 'ranks' holding halves of the sequence: the gather gets the hidden states in the compute dtype (bf16
    under autocast, not the fp32 norm output), the gradient kept for backward is bf16 (its values are: made by a
    bf16 GEMM), and the reduction gets it in fp32 scaled by the incoming gradient, bit for bit what the function
    gives without collectives on the whole sequence."""
    torch.manual_seed(0)
    h = torch.randn(2, 12, 16)
    w = (torch.randn(37, 16) * 0.3).requires_grad_(True)
    y = torch.randint(0, 37, (2, 12)).masked_fill(torch.rand(2, 12) < 0.2, -100)
    seen = []

    def gather(x):  # both halves, as if each rank sent its own: this rank's is the first half
        seen.append(("gather", x.dtype))
        return torch.cat([x, other.to(x.dtype)], dim=1)

    def reduce_grad(grad):  # this rank's half of the sum (the other rank's part of it is zero here)
        seen.append(("reduce", grad.dtype))
        return grad[:, :6]

    mine, other = h[:, :6].clone().requires_grad_(True), h[:, 6:]
    whole = h.clone().requires_grad_(True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.dtype) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(mine, w, y, 5, input_collectives=InputCollectives(gather, reduce_grad))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = linear_cross_entropy(whole, w, y, 5)
    (loss / 3).backward()
    grad_w, w.grad = w.grad.clone(), None
    (ref / 3).backward()
    assert seen == [("gather", torch.bfloat16), ("reduce", torch.float32)]
    assert kept == [torch.bfloat16, torch.float32]  # dX in bf16, dW in fp32
    assert torch.equal(loss, ref) and torch.equal(grad_w, w.grad)
    assert mine.grad.dtype == torch.float32 and torch.equal(mine.grad, whole.grad[:, :6])


@pytest.mark.parametrize("autocast", [True, False])
def test_linear_cross_entropy_backward_makes_no_tensor_beside_the_kept_gradients(autocast):
    """The fused loss's backward scales the gradients its forward kept by the incoming one, in place (their last
    use), and returns them: under bf16 autocast (the dX kept in bf16, the hidden fp32) it makes only the fp32 dX it
    returns, in fp32 nothing at all. It made a scaled copy of each: an fp32 [V, D] dW and a [tokens, D] dX more,
    alive beside the kept ones at the start of backward (more tokens than the vocabulary here, so a second fp32
    [tokens, D] tensor would show too). A second backward through the graph is refused, not scaled twice."""
    torch.manual_seed(0)
    h = torch.randn(2, 40, 16, requires_grad=True)
    w = (torch.randn(37, 16) * 0.3).requires_grad_(True)
    y = torch.randint(0, 37, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(h, w, y, 16)
    with LiveStorages({w.untyped_storage().data_ptr(), h.untyped_storage().data_ptr()}) as storages:
        storages.mark("backward")
        (loss / 3).backward()
    made = 4 * h.numel() if autocast else 0  # the fp32 copy of the bf16 dX
    assert made <= storages.peaks["backward"] <= made + 64, (storages.peaks, made)  # 64: the scalars
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(h, w, y, 16)
    (loss / 3).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss / 3).backward()


def _train_two_steps(train_overrides: dict, compile_backend: str | None = None,
                     expect_loss_compile: dict | None = None):
    from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
    from nanotronix.train.optimizer import param_groups
    from nanotronix.train.step import train_step

    cfg = config_from_dict({
        "model": {k: getattr(CFG, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size",
                                               "max_position_embeddings", "rope_theta", "rms_norm_eps",
                                               "tie_word_embeddings", "init_std")},
        "train": dict({"seq_len": 16, "global_batch_size": 4, "micro_batch_size": 2}, **train_overrides),
    })
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), ParallelContext.build(cfg), cfg)
    if compile_backend is not None:  # what train.compile does, with a backend that needs no C++ build
        torch._dynamo.reset()
        apply_compile(model, compile_backend)
        assert model.chunks[-1].loss_compile == {"backend": compile_backend, "mode": None}
    if expect_loss_compile is not None:  # train.compile applied by parallelize()
        assert model.chunks[-1].loss_compile == expect_loss_compile
    o = cfg.optimizer
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), o.weight_decay), lr=1e-2,
                               betas=tuple(o.betas), eps=o.eps)
    g = torch.Generator().manual_seed(1)
    losses = [train_step(model, opt, torch.randint(0, CFG.vocab_size, (2, 2, 17), generator=g), 1e-2, 1.0).loss
              for _ in range(2)]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("overrides, compile_backend", [
    ({"loss_chunk_size": 5}, None), ({"fused_kernels": True}, None),
    ({"recompute": "selective", "loss_chunk_size": 3}, None), ({"loss_chunk_size": 5}, "aot_eager")])
def test_trainer_path_with_switches_matches_plain(overrides, compile_backend):
    """parallelize() applies the switches; two optimizer steps give the plain run's losses and weights."""
    ref_losses, ref_params = _train_two_steps({})
    losses, params = _train_two_steps(overrides, compile_backend)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    # Adam normalises each gradient entry, so rounding-level differences in near-zero entries move weights by a
    # small fraction of lr (1e-2); a wrong gradient moves them by ~lr.
    for name, p in ref_params.items():
        assert torch.allclose(params[name], p, atol=2e-4), name


def test_compile_mode_max_autotune_matches_plain():
    """train.compile_mode reaches every torch.compile of the trainer path (the decoder layers and the fused loss's
    chunks): Inductor with GEMM autotuning (C++ templates on the CPU, Triton on CUDA) gives the plain run's
    losses and weights."""
    torch._dynamo.reset()
    ref_losses, ref_params = _train_two_steps({})
    mode = "max-autotune-no-cudagraphs"
    losses, params = _train_two_steps({"compile": True, "compile_mode": mode, "loss_chunk_size": 5},
                                      expect_loss_compile={"backend": "inductor", "mode": mode})
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    for name, p in ref_params.items():
        assert torch.allclose(params[name], p, atol=2e-4), name


def test_compile_backend_reaches_every_compile_of_the_trainer_path(monkeypatch):
    """train.compile_backend reaches the decoder layers and the fused loss's chunks: the backend that generates no code
    (what the layout tests compile with) gives the plain run's losses and weights."""
    compiled_layers, real_compile = [], torch.nn.Module.compile

    def compile_layer(layer, **options):  # Module.compile, recording what each decoder layer was given
        compiled_layers.append(options["backend"])
        return real_compile(layer, **options)
    monkeypatch.setattr(torch.nn.Module, "compile", compile_layer)
    torch._dynamo.reset()
    ref_losses, ref_params = _train_two_steps({})
    backend = "aot_eager_decomp_partition"
    losses, params = _train_two_steps({"compile": True, "compile_backend": backend, "loss_chunk_size": 5},
                                      expect_loss_compile={"backend": backend, "mode": None})
    assert compiled_layers == [backend] * CFG.num_hidden_layers, compiled_layers
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    for name, p in ref_params.items():
        assert torch.allclose(params[name], p, atol=2e-4), name


@pytest.mark.parametrize("train,message", [
    ({"recompute": "some"}, "train.recompute"),
    ({"loss_chunk_size": -1}, "train.loss_chunk_size"),
    ({"compile": True, "fused_kernels": True}, "train.fused_kernels"),
    ({"compile": "yes"}, "train.compile"),
    ({"compile": True, "compile_mode": "max-autotune"}, "train.compile_mode"),
    ({"compile_mode": "max-autotune-no-cudagraphs"}, "needs train.compile: true"),
    ({"compile": True, "compile_backend": "tvm"},
     re.escape("train.compile_backend: 'tvm' is not inductor|aot_eager_decomp_partition|aot_eager")),
    ({"compile_backend": "aot_eager"}, "train.compile_backend: 'aot_eager' needs train.compile: true"),
    ({"compile": True, "compile_backend": "aot_eager", "compile_mode": "max-autotune-no-cudagraphs"},
     "train.compile_mode: 'max-autotune-no-cudagraphs' is Inductor's: it needs train.compile_backend: inductor"),
    # accepted, it failed at step 1 in a traceback (nanotronix::accumulate_weight_grad ran on a copy of a buffer)
    ({"dtype": "bfloat16", "bf16_weight_cache": True, "grad_accumulation_fusion": True, "compile": True,
      "compile_backend": "aot_eager_decomp_partition"},
     "train.grad_accumulation_fusion: needs train.compile_backend: inductor under train.compile \\(got "
     "'aot_eager_decomp_partition'"),
])
def test_switch_validation(train, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": {"preset": "smollm2-135m"}, "train": train})


@pytest.mark.parametrize("backend, device", [("aot_eager", "cpu"), ("inductor", "cpu"),
                                             pytest.param("inductor", "cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_loss_chunks_match_eager(backend, device, dtype):
    """`compile_options` runs each chunk's matmul + softmax + gradient through torch.compile (Inductor generates
    the fused kernels: C++ on the CPU, Triton on CUDA); same loss and gradients as the eager chunks, a short last
    chunk included (63 tokens in chunks of 16)."""
    torch.manual_seed(0)
    h = torch.randn(3, 21, 16, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                    device=device, requires_grad=True)
    w = (torch.randn(50, 16, dtype=h.dtype, device=device) * 0.3).requires_grad_(True)
    y = torch.randint(0, 50, (3, 21), device=device)
    results = []
    for compile_options in (None, {"backend": backend}):
        h.grad = w.grad = None
        out = linear_cross_entropy(h, w, y, 16, compute_dtype=dtype, compile_options=compile_options)
        out.backward(torch.tensor(0.7, dtype=out.dtype, device=device))
        results.append((out.detach(), h.grad.clone(), w.grad.clone()))
    (ref, ref_h, ref_w), (got, got_h, got_w) = results
    # the logits are fp32 in both (by design), and Inductor's vectorised exp rounds differently from eager's
    tol = {"atol": 1e-7, "rtol": 1e-5} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-2}
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got_h, ref_h, **tol)
    torch.testing.assert_close(got_w, ref_w, **tol)
    assert ref_w.abs().max() > 1e-3  # the gradients are not trivially zero


def test_weight_decay_reaches_the_norm_gains_only_when_asked():
    """optimizer.weight_decay_norms: SmolLM2's nanotron decayed every parameter (one AdamW group); the default, as
    transformers' Trainer, leaves the RMSNorm gains undecayed. One AdamW step with zero gradients and lr 1 moves a
    parameter by exactly -weight_decay * itself where it is decayed, not at all otherwise."""
    from nanotronix.train.optimizer import param_groups

    cfg = ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=40, max_position_embeddings=8, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, init_std=0.05)
    for decay_norms in (False, True):
        model = build_model(cfg)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(param_groups(model.named_parameters(), 0.1, decay_norms), lr=1.0)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in model.named_parameters():
            decayed = decay_norms or p.ndim >= 2
            assert torch.allclose(p, before[n] * (0.9 if decayed else 1.0)), (decay_norms, n)
