"""`train.bf16_weight_cache` (nanotronix/parallel/compute_weights.py), one process: bf16 training steps whose decoder
linears multiply with bf16 copies cast once per step are bit-identical to the plain autocast steps (eager and
traced by torch.compile), the copies are really the ones used, and outside a step the layers read the fp32
weights. The multi-rank layouts (TP + SP + ZeRO-1, pipeline) are in tests/test_parallel_layouts.py."""
import math

import pytest
import torch

from helpers import requires_cuda
from nanotronix.config import ConfigError, config_from_dict
from nanotronix.model import build_model
from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
from nanotronix.parallel.speedups import apply_compile
from nanotronix.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from nanotronix.train.optimizer import param_groups
from nanotronix.train.step import train_step

MODEL = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 32, "init_std": 0.05,
         "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
STEPS = 3


def _cfg(cache: bool, dtype: str = "bfloat16", recompute: str = "none", fused: bool = False):
    return config_from_dict({"model": MODEL, "parallel": {"grad_bucket_size": 3000},
                             "train": {"seq_len": 12, "global_batch_size": 6, "micro_batch_size": 2, "dtype": dtype,
                                       "bf16_weight_cache": cache, "recompute": recompute,
                                       "grad_accumulation_fusion": fused},
                             "optimizer": {"lr": 1e-2, "weight_decay": 0.1}})


def _data():
    return torch.randint(0, MODEL["vocab_size"], (STEPS, 3, 2, 13), generator=torch.Generator().manual_seed(7))


def _model(cache: bool, compiled, device: str = "cpu", recompute: str = "none", fused: bool = False):
    """compiled: False, True (the aot_eager backend: fast, and what Inductor receives) or a backend name."""
    cfg = _cfg(cache, recompute=recompute, fused=fused)
    torch.manual_seed(0)
    # eager attention on CUDA: its backward is deterministic (flash / mem-efficient SDPA accumulate atomically)
    model = build_model(cfg.model, "sdpa" if device == "cpu" else "eager").to(device)
    model = parallelize(model, ParallelContext.build(cfg), cfg)
    if compiled:
        torch._dynamo.reset()
        apply_compile(model, backend="aot_eager" if compiled is True else compiled)
    return model


def _train(cache: bool, compiled: bool, device: str = "cpu", recompute: str = "none", fused: bool = False):
    model = _model(cache, compiled, device, recompute, fused)
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.1), lr=1e-2, betas=(0.9, 0.95),
                               eps=1e-8)
    linear_weights = [m.weight for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    fp32_grad_views = []
    losses = []
    for batch in _data().to(device):
        losses.append(train_step(model, opt, batch, lr=1e-2, clip_grad=1.0).loss)
        fp32_grad_views.append(all(p.grad is None or p.grad.data_ptr() == p.main_grad.data_ptr()
                                   for p in model.parameters()))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, losses, weights, linear_weights, fp32_grad_views


@pytest.mark.parametrize("compiled, device", [(False, "cpu"), (True, "cpu"),
                                              pytest.param(False, "cuda", marks=requires_cuda),
                                              pytest.param(True, "cuda", marks=requires_cuda)],
                         ids=["eager", "compiled", "cuda-eager", "cuda-compiled"])
def test_cached_bf16_weights_give_bit_identical_steps(compiled, device):
    _, ref_losses, ref_weights, _, _ = _train(cache=False, compiled=compiled, device=device)
    model, losses, weights, linears, grad_views = _train(cache=True, compiled=compiled, device=device)
    assert losses == ref_losses
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    init = build_ref_init()
    moved = [n for n in weights if not torch.equal(weights[n].cpu(), init[n])]
    assert len(moved) == len(weights)  # the steps did train every tensor (so equality above means something)

    cache = model.grads.compute_weights
    # 2 layers x (qkv, o, gate_up, down) decoder linears (the tied head is not cached); each of their gradients
    # arrived through the cache leaf, not through the fp32 parameter, and left nothing behind.
    assert len(cache.leaves) == 8 == len([p for p in linears if p.ndim == 2]) - 1
    assert all(leaf.grad is None and leaf.dtype == torch.bfloat16 for leaf in cache.leaves)
    microbatches = _data().shape[1]
    assert cache.gradients_received == 8 * microbatches
    assert model.grads.grads_received == len(list(model.parameters())) * microbatches
    assert model.grads.copied_grads == 0 and all(grad_views)
    assert all(m.compute_weight is None for m in cache.linears)  # disarmed after the step


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_cache_with_recompute_is_bit_identical(recompute):
    """Recomputation re-runs layer forwards inside the backward, while the copies are still in use."""
    _, ref_losses, ref_weights, _, _ = _train(cache=False, compiled=False, recompute=recompute)
    model, losses, weights, _, _ = _train(cache=True, compiled=False, recompute=recompute)
    assert losses == ref_losses
    assert all(torch.equal(weights[n], ref_weights[n]) for n in weights)
    assert model.grads.compute_weights.gradients_received == 8 * _data().shape[1]


def build_ref_init():
    torch.manual_seed(0)
    cfg = _cfg(False)
    model = parallelize(build_model(cfg.model, "sdpa"), ParallelContext.build(cfg), cfg)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_compiled_cache_does_not_recompile():
    """The copies are refreshed in place, so the compiled layers see the same tensors every step, and every layer
    still shares the one graph (a per-layer copy must not make each layer a graph of its own)."""
    from torch._dynamo.utils import counters
    graphs = {}
    for cache in (False, True):
        counters.clear()
        _train(cache=cache, compiled=True)  # 3 steps of 3 micro-batches, 2 layers
        graphs[cache] = counters["stats"]["unique_graphs"]
    assert graphs[True] == graphs[False] == 1


def test_outside_a_step_the_layers_read_the_fp32_weights():
    """Weights changed after a step (as a checkpoint load or an export would) are what a forward then sees: the
    cached copies are not used outside train_step."""
    model, _, _, _, _ = _train(cache=True, compiled=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    cfg = _cfg(False)
    torch.manual_seed(0)
    plain = parallelize(build_model(cfg.model, "sdpa"), ParallelContext.build(cfg), cfg)
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, MODEL["vocab_size"], (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(ids), plain(ids))


def test_cache_needs_bf16():
    with pytest.raises(ConfigError, match="train.bf16_weight_cache: needs train.dtype bfloat16"):
        _cfg(True, dtype="float32")


# ---- train.grad_accumulation_fusion (nanotronix/parallel/grad_accumulation_fusion.py): the bf16 copies' weight
# gradients accumulated in fp32 by the wgrad GEMM itself (on CPU through the op's PyTorch twin)

def _step_gradients(fused: bool, compiled=False, recompute: str = "none", device: str = "cpu"):
    """One training step's summed gradients (every bucket's main_grad, before the update) and its loss."""
    model = _model(True, compiled, device, recompute, fused)
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.1), lr=1e-2, betas=(0.9, 0.95),
                               eps=1e-8)
    grads = {}
    opt.step = lambda lr: grads.update({n: p.main_grad.detach().clone() for n, p in model.named_parameters()})
    loss = train_step(model, opt, _data()[0].to(device), lr=1e-2, clip_grad=0.0).loss
    return model, loss, grads


def _decoder_linear_names(model):
    return {n for n, p in model.named_parameters()
            if any(m.weight is p for m in model.grads.compute_weights.linears)}


@pytest.mark.parametrize("compiled, device", [(False, "cpu"), ("inductor", "cpu"),
                                              pytest.param(False, "cuda", marks=requires_cuda),
                                              pytest.param("inductor", "cuda", marks=requires_cuda)],
                         ids=["eager", "inductor", "cuda-eager", "cuda-inductor"])
def test_fused_accumulation_gives_the_fp32_sum_of_the_same_gradients(compiled, device):
    ref_model, ref_loss, ref = _step_gradients(fused=False, compiled=compiled, device=device)
    model, loss, got = _step_gradients(fused=True, compiled=compiled, device=device)
    assert loss == ref_loss  # the same forward
    linears = _decoder_linear_names(model)
    assert len(linears) == 8
    for name in ref:
        if name not in linears:  # norms, embedding: untouched by the fusion, and dx is the same bf16 matmul
            assert torch.equal(got[name], ref[name]), name
    # the decoder linears' gradients are the same sums without the bf16 rounding of each micro-batch's gradient:
    # close (3 roundings of 2^-9 at most), and not equal (the rounding is really gone)
    for name in linears:
        err = ((got[name] - ref[name]).norm() / ref[name].norm()).item()
        assert err < 4e-3, (name, err)
    assert sum(not torch.equal(got[n], ref[n]) for n in linears) == len(linears)

    cache, microbatches = model.grads.compute_weights, _data().shape[1]
    assert cache.gradients_received == 8 * microbatches  # every arrival reported through the op
    assert model.grads.grads_received == len(list(model.parameters())) * microbatches
    assert all(leaf.grad is None for leaf in cache.leaves)  # no bf16 gradient was made
    assert model.grads.copied_grads == 0
    assert all(m.weight_grad_target is None and m.compute_weight is None for m in cache.linears)  # disarmed
    from nanotronix.parallel import grad_accumulation_fusion
    assert not grad_accumulation_fusion._listeners  # and no longer listening


def test_fused_accumulation_is_the_exact_fp32_sum():
    """Against an fp64 recomputation of the same sum: grad_out^T @ input of each micro-batch, from the very bf16
    tensors the backward saw, summed over the micro-batches (what the CUDA GEMM computes, up to the order)."""
    from nanotronix.kernels import reference
    calls = []
    original = reference.wgrad_accumulate_fp32

    def recording(main_grad, grad_out, inp):
        calls.append((main_grad.data_ptr(), grad_out.double().t() @ inp.double()))
        original(main_grad, grad_out, inp)

    reference.wgrad_accumulate_fp32 = recording
    try:
        model, _, got = _step_gradients(fused=True)
    finally:
        reference.wgrad_accumulate_fp32 = original
    names = {p.main_grad.data_ptr(): n for n, p in model.named_parameters()}
    exact = {}
    for ptr, g in calls:
        exact[names[ptr]] = exact.get(names[ptr], 0) + g
    assert set(exact) == _decoder_linear_names(model)
    for name, want in exact.items():
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_fused_accumulation_with_recompute(recompute):
    """Recomputed forwards inside the backward must not accumulate twice: same gradients as without recompute."""
    _, loss, want = _step_gradients(fused=True)
    model, got_loss, got = _step_gradients(fused=True, recompute=recompute)
    assert got_loss == loss
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert model.grads.compute_weights.gradients_received == 8 * _data().shape[1]


def test_fused_training_steps_follow_the_cache_path():
    """Whole steps (update included): the same first loss, then the runs part only by the gradients' bf16
    rounding, which Adam's normalisation amplifies for near-zero gradients: each weight's distance to the cache
    path's is a few percent of how far the three steps moved it (measured: <= 3.2%)."""
    _, ref_losses, ref_weights, _, _ = _train(cache=True, compiled=False)
    _, losses, weights, _, _ = _train(cache=True, compiled=False, fused=True)
    assert losses[0] == ref_losses[0] and losses == pytest.approx(ref_losses, rel=1e-3)
    init = build_ref_init()
    for name in weights:
        moved = (ref_weights[name] - init[name]).norm()
        assert (weights[name] - ref_weights[name]).norm() < 0.1 * moved, name


def test_compiled_fused_accumulation_does_not_recompile():
    """One graph for all layers: the op finds each layer's buffer by its address, not by a per-layer constant."""
    from torch._dynamo.utils import counters
    counters.clear()
    _train(cache=True, compiled="inductor", fused=True)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_backend_that_copies_the_buffer_fails_loudly():
    """aot_eager functionalises the op's mutation into a copy of the bucket and does not re-inplace it: the op must
    not report a gradient that is only in the copy (the bucket reduction would start before the copy-back)."""
    with pytest.raises(RuntimeError, match="ran on a copy of a gradient buffer"):
        _step_gradients(fused=True, compiled=True)


def test_fusion_needs_the_cache():
    with pytest.raises(ConfigError, match="train.grad_accumulation_fusion: needs train.bf16_weight_cache"):
        _cfg(False, fused=True)


def test_a_step_that_dies_half_way_does_not_keep_its_model_alive():
    """The op's table of listeners is module-level: a step interrupted before `disarm` (an out-of-memory error in
    the benchmark, say) must not keep that model's weights and buckets alive for the next run."""
    import gc
    import weakref
    model = _model(True, False, fused=True)
    model.grads.start(3)  # armed: listening on every decoder linear's gradient buffer, never disarmed
    alive = weakref.ref(model.grads)
    del model
    gc.collect()
    assert alive() is None


def test_a_backward_for_input_gradients_only_accumulates_nothing():
    """torch.distributed.pipelining asks autograd.grad for the stage inputs' gradients on its first step: the fused
    accumulation must not add weight gradients then (the leaf path never did: no accumulator runs)."""
    from nanotronix.model.llama import DecoderLayer
    from nanotronix.model.rope import rope_cos_sin
    model = _model(True, False, fused=True)
    model.grads.start(1)
    layer = next(m for m in model.modules() if isinstance(m, DecoderLayer))
    cos, sin = rope_cos_sin(torch.arange(12), MODEL["hidden_size"] // MODEL["num_attention_heads"], 10000.0)
    h = torch.randn(2, 12, MODEL["hidden_size"], requires_grad=True)
    weights = [m.weight for m in layer.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(h, cos, sin)
    (grad_h,) = torch.autograd.grad(out.float().sum(), h, retain_graph=True)
    assert grad_h.abs().sum() > 0
    assert all(w.main_grad.abs().sum() == 0 for w in weights)
    assert model.grads.compute_weights.gradients_received == 0
    out.float().sum().backward()  # the full backward does accumulate, once per weight
    assert all(w.main_grad.abs().sum() > 0 for w in weights)
    assert model.grads.compute_weights.gradients_received == len(weights) == 4


def test_a_non_finite_gradient_leaves_the_weights_and_moments_alone():
    """One inf gradient (the loss stays finite): train_step reports it and applies nothing, neither to the weights
    nor to the AdamW moments; the next step trains as usual."""
    model = _model(cache=False, compiled=False)
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.1), lr=1e-2, betas=(0.9, 0.95),
                               eps=1e-8)
    data = _data()
    assert train_step(model, opt, data[0], lr=1e-2, clip_grad=1.0).applied
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = {n: {k: v.clone() for k, v in s.items()} for n, s in opt.param_states().items()}  # views: a copy
    victim = next(p for n, p in model.named_parameters() if n.endswith("down_proj.weight"))
    hook = victim.register_hook(lambda g: g * float("inf"))
    result = train_step(model, opt, data[1], lr=1e-2, clip_grad=1.0)
    hook.remove()
    assert not result.applied and not math.isfinite(result.grad_norm)
    assert math.isfinite(result.loss)  # the forward was fine
    assert opt.step_count == 1
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    after = opt.param_states()
    assert all(torch.equal(after[n][k], states[n][k]) for n in states for k in states[n])
    assert train_step(model, opt, data[2], lr=1e-2, clip_grad=1.0).applied and opt.step_count == 2
