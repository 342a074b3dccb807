"""The update of `DistributedOptimizer` (parallel/optimizer.py) in one process is `torch.optim.AdamW`'s on the plain
model's tensors with the same parameter groups, bit for bit: the foreach implementation (CPU runs) and the fused one
(every CUDA run; no other CPU test runs it), weight decay on the matrices only or on the norm gains too, through the
first steps' bias correction, a learning rate that changes every step, and a resume into a fresh optimizer through
`param_states` / `load_param_states` half-way. The multi-rank layouts are compared with a single process in
tests/test_parallel_layouts.py (~2 s)."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import TINY_MODEL
from nanotronix.config import config_from_dict
from nanotronix.model import build_model
from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
from nanotronix.train.optimizer import param_groups

STEPS, RESUME_AFTER, PEAK = 6, 3, 1e-2
ADAMW = {"betas": (0.9, 0.95), "eps": 1e-8}


def _ours(decay_norms: bool, fused):
    """(the plain model's twin, our model on it, our optimizer): small gradient buckets, several per model."""
    cfg = config_from_dict({"model": TINY_MODEL, "parallel": {"grad_bucket_size": 20_000},
                            "train": {"seq_len": 8, "global_batch_size": 1, "micro_batch_size": 1,
                                      "dtype": "float32"}})
    torch.manual_seed(0)
    plain = build_model(cfg.model, "sdpa")
    twin = copy.deepcopy(plain)
    model = parallelize(plain, ParallelContext.build(cfg), cfg)
    groups = param_groups(model.named_parameters(), 0.1, decay_norms)
    return twin, model, DistributedOptimizer(model, groups, lr=PEAK, fused=fused, **ADAMW)


@pytest.mark.parametrize("fused", [None, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("decay_norms", [False, True])
def test_the_update_is_torch_adamw_bit_for_bit_across_a_resume(fused, decay_norms):
    reference, model, optimizer = _ours(decay_norms, fused)
    assert len(model.grads.buckets) > 1
    named = dict(reference.named_parameters())
    # the README's rule, plainly: decay on the matrices (embedding included), on the norm gains only when asked
    decayed = [p for p in named.values() if p.ndim >= 2 or decay_norms]
    kept = [p for p in named.values() if not (p.ndim >= 2 or decay_norms)]
    theirs = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": kept, "weight_decay": 0.0}],
                               lr=PEAK, fused=fused, **ADAMW)
    # a piece per parameter without ZeRO-1; an empty group (no norm left undecayed) is left out
    assert [len(g["params"]) for g in theirs.param_groups if g["params"]] == \
        [len(g["params"]) for g in optimizer.param_groups]
    gradients = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        if step == RESUME_AFTER + 1:  # a fresh model and optimizer given the weights and moments saved after 3 steps
            saved = {n: {k: v.clone() for k, v in s.items()} for n, s in optimizer.param_states().items()}
            _, resumed, optimizer_after = _ours(decay_norms, fused)
            with torch.no_grad():
                for p, q in zip(resumed.parameters(), model.parameters()):
                    p.copy_(q)
            for names in optimizer_after.load_groups():
                optimizer_after.load_param_states({n: saved[n] for n in names}, optimizer.step_count)
            model, optimizer = resumed, optimizer_after
        lr = PEAK * step / STEPS
        model.grads.start(1)
        for name, p in model.named_parameters():
            grad = torch.randn(p.shape, generator=gradients)
            p.main_grad.copy_(grad)
            named[name].grad = grad
        optimizer.step(lr)
        for group in theirs.param_groups:
            group["lr"] = lr
        theirs.step()
        for name, p in model.named_parameters():
            assert torch.equal(p, named[name]), (step, name)
    moments = optimizer.param_states()
    for name, p in named.items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[name][k], theirs.state[p][k]), (name, k)
    assert optimizer.step_count == STEPS
