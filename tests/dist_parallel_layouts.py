"""torchrun worker for tests/test_parallel_layouts.py: train the tiny model for a few steps in several layouts.

    torchrun --nproc_per_node=N tests/dist_parallel_layouts.py --out DIR LAYOUT [LAYOUT ...]

A LAYOUT is `name:key=value,...` with ParallelConfig fields (tp, pp, pp_schedule, virtual_stages, sequence_parallel,
zero_stage), `model.NAME` and `train.NAME` fields. For each layout every rank writes DIR/NAME/rank{R}.pt with its
parameter shards (plus `tp_shard_dim`), its optimizer `param_states()` and its coordinates; global rank 0 also
writes the per-step losses and gradient norms. The test assembles the logical tensors from the shards and compares
them with a single-process run, so this script only trains and records.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_common import (STEPS, VALIDATE_AFTER, VALIDATION_WINDOWS, make_config, make_data,  # noqa: E402
                         make_validation_windows, rank_batch, run_layouts_main)
from nanotronix.model import build_model  # noqa: E402
from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize  # noqa: E402
from nanotronix.train.optimizer import param_groups  # noqa: E402
from nanotronix.train.step import train_step  # noqa: E402
from nanotronix.train.validation import Validator  # noqa: E402


def run_layout(name: str, parallel: dict, out: Path) -> None:
    from torch._dynamo.utils import counters
    # each layout compiles afresh, as the run of a user (one layout per process) does: under torch 2.11 a layout's
    # compiled layers found the previous one's cached graphs and recompiled on their guards, counting 4 graphs
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]  # train.compile layouts: graphs dynamo compiled for this one
    cfg = make_config(parallel)
    ctx = ParallelContext.build(cfg)
    torch.manual_seed(cfg.train.seed)
    model = parallelize(build_model(cfg.model, "sdpa"), ctx, cfg)
    o = cfg.optimizer
    optimizer = DistributedOptimizer(model, param_groups(model.named_parameters(), o.weight_decay), lr=o.lr,
                                     betas=tuple(o.betas), eps=o.eps)
    data = make_data(cfg)
    windows = make_validation_windows(cfg)
    validator = Validator(model, ctx, {"heldout": lambda first, count: windows[first:first + count]},
                          VALIDATION_WINDOWS,
                          cfg.train.global_batch_size // (cfg.train.micro_batch_size * ctx.dp),
                          cfg.train.micro_batch_size)
    losses, norms, val_losses = [], [], []
    # the last step's DP reduction of each bucket: this rank's summed fp32 gradient going in, and its reduced shard
    # as the reduction left it (before clipping scales it)
    reductions, reduced = {}, {}
    for step in range(1, STEPS + 1):
        if step == STEPS:
            grads, reduce, finish = model.grads, model.grads._reduce, model.grads.finish

            def recording_reduce(b, async_op):
                reductions[b.index] = b.grad.detach().clone()
                return reduce(b, async_op)

            def recording_finish():
                finish()
                reduced.update({b.index: (b.shard_start, b.shard_end, b.shard_grad.detach().clone())
                                for b in grads.buckets})
            grads._reduce, grads.finish = recording_reduce, recording_finish
        result = train_step(model, optimizer, rank_batch(cfg, data, step, ctx.dp_rank, ctx.dp), o.lr,
                            o.clip_grad)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if step in VALIDATE_AFTER and step < STEPS:  # the last step's is scored after the records below
            val_losses.append(validator.run()["heldout"])
    grads = model.grads
    # ZeRO-1 with overlap_param_gather: the last step's weight gathers are still pending here, and the waits of the
    # previous ones happened part by part during the last step's forward.
    gathers_pending = grads.gathers_pending()
    # ZeRO-1 with bf16 twins: the buckets whose last weight gather went into their bf16 twins
    twin_gathered = [b.twin_version is not None for b in grads.buckets]
    gathers_waited_after = [b.gather_waited_after for b in grads.buckets]
    grads.wait_for_weights()
    val_losses.append(validator.run()["heldout"])  # after the records of the last step's gathers and reductions
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = optimizer.param_states()
    # Checkpoint contract: a fresh optimizer loaded with these states reports exactly the same states.
    fresh = DistributedOptimizer(model, param_groups(model.named_parameters(), o.weight_decay), lr=o.lr,
                                 betas=tuple(o.betas), eps=o.eps)
    fresh.load_param_states(states, optimizer.step_count)
    reloaded = fresh.param_states()
    roundtrip = fresh.step_count == optimizer.step_count and reloaded.keys() == states.keys() and all(
        torch.equal(reloaded[n][k], states[n][k]) for n in states for k in states[n])
    torch.save({
        "coords": {"tp": ctx.tp_rank, "dp": ctx.dp_rank, "pp": ctx.pp_rank},
        "params": params,
        "tp_shard_dim": {n: p.tp_shard_dim for n, p in model.named_parameters()},
        "states": states,
        "step_count": optimizer.step_count,
        "states_roundtrip": roundtrip,
        "losses": losses,
        # last step's bucket reductions: when each started, in gradients received so far
        "buckets": [{"launched_after": b.launched_after, "deferred": b.deferred} for b in grads.buckets],
        "microbatches": grads.num_microbatches,
        "copied_grads": grads.copied_grads,
        # train.bf16_weight_cache: gradients that came through the bf16 copies in the last step
        "cached_gradients": grads.compute_weights.gradients_received if grads.compute_weights else 0,
        "num_params": sum(len(b.params) for b in grads.buckets),
        "gathers_pending": gathers_pending,
        "unique_graphs": counters["stats"]["unique_graphs"] - graphs_before,
        "gathers_waited_after": gathers_waited_after,
        "twin_gathered": twin_gathered,
        "reduction_inputs": reductions if "reduce" in name else None,
        "reduced": reduced if "reduce" in name else None,
    }, folder / f"rank{ctx.rank}.pt")
    if ctx.rank == 0:
        (folder / "metrics.json").write_text(json.dumps({"losses": losses, "grad_norms": norms,
                                                          "val_losses": val_losses}))
    dist.barrier()


if __name__ == "__main__":
    run_layouts_main(__doc__.splitlines()[0], run_layout)
