"""What a checkpoint save costs on the accelerator. Without ZeRO-1 the moments a save collects are the optimizer's own
state tensors (no copy on the device), for the DistributedOptimizer and a plain torch AdamW alike. ~10 s.
"""
from __future__ import annotations

import torch

from checkpoint_helpers import adamw, plain_model, train_steps


def _parallel_run():
    """A single-process parallelized model (several gradient buckets) with its DistributedOptimizer, and a step()."""
    from dist_common import make_config, make_data, rank_batch

    from nanotronix.model import build_model
    from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
    from nanotronix.train.optimizer import param_groups
    from nanotronix.train.step import train_step

    cfg = make_config({})
    ctx = ParallelContext.build(cfg)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), ctx, cfg)
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.1), lr=1e-3, betas=(0.9, 0.95),
                               eps=1e-8)
    data = make_data(cfg)
    steps = iter(range(1, 10**6))

    def step():
        train_step(model, opt, rank_batch(cfg, data, next(steps), 0, 1), lr=1e-3, clip_grad=1.0)

    return cfg, ctx, model, opt, step


def test_without_zero1_param_states_hands_out_the_optimizers_own_moments():
    """No copy of the moments on the device at a save: the state tensors themselves (views in the parameters'
    shapes), for every parameter and for the subset a writer asks for."""
    from nanotronix.checkpoint.state import optimizer_access

    _, _, model, opt, step = _parallel_run()
    assert not opt.sharded and len(model.grads.buckets) >= 4
    before = opt.param_states()  # zeros before the first step: AdamW's starting point
    assert all(not v.any() for s in before.values() for v in s.values())
    step()
    states = opt.param_states()
    names = {opt.names[id(p)] for p in model.grads.buckets[0].params}
    some = opt.param_states(names)
    assert set(some) == names
    for piece in opt.pieces:
        name = opt.names[id(piece.param)]
        for k in ("exp_avg", "exp_avg_sq"):
            own = opt.inner.state[piece.tensor][k]
            assert states[name][k].data_ptr() == own.data_ptr() and states[name][k].shape == piece.param.shape
            assert name not in names or some[name][k].data_ptr() == own.data_ptr()
            assert states[name][k].dtype == torch.float32

    plain = plain_model()
    optimizer = adamw(plain)
    train_steps(plain, optimizer, range(1))
    access = optimizer_access(optimizer, plain)
    got = access.param_states()
    for name, p in plain.named_parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert got[name][k].data_ptr() == optimizer.state[p][k].data_ptr(), (name, k)
