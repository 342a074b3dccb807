"""`train.bf16_weight_cache` (nanotronix/parallel/compute_weights.py), one process: bf16 training steps whose decoder
linears multiply with bf16 copies cast once per step are bit-identical to the plain autocast steps (eager and
traced by torch.compile), the copies are really the ones used, and outside a step the layers read the fp32
weights. The multi-rank layouts (TP + SP + ZeRO-1, pipeline) are in tests/test_parallel_layouts.py."""
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


def _cfg(cache: bool, dtype: str = "bfloat16", recompute: str = "none"):
    return config_from_dict({"model": MODEL, "parallel": {"grad_bucket_size": 3000},
                             "train": {"seq_len": 12, "global_batch_size": 6, "micro_batch_size": 2, "dtype": dtype,
                                       "bf16_weight_cache": cache, "recompute": recompute},
                             "optimizer": {"lr": 1e-2, "weight_decay": 0.1}})


def _data():
    return torch.randint(0, MODEL["vocab_size"], (STEPS, 3, 2, 13), generator=torch.Generator().manual_seed(7))


def _train(cache: bool, compiled: bool, device: str = "cpu", recompute: str = "none"):
    cfg = _cfg(cache, recompute=recompute)
    torch.manual_seed(0)
    # eager attention on CUDA: its backward is deterministic (flash / mem-efficient SDPA accumulate atomically)
    model = build_model(cfg.model, "sdpa" if device == "cpu" else "eager").to(device)
    model = parallelize(model, ParallelContext.build(cfg), cfg)
    if compiled:
        torch._dynamo.reset()
        apply_compile(model, backend="aot_eager")
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
