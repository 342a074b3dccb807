"""Resharded resume of the real `DistributedOptimizer` (test_checkpoint_reshard.py checks the moments bit for bit only
through a stand-in optimizer, and the real one only by the loss). One start of four gloo ranks:

1. Each of three layouts trains the tiny model 3 steps and saves, each with the writers of `state.assign_writers`:
   ZeRO-1 over DP4 (shard boundaries inside parameters), TP2 with sequence parallelism x ZeRO-1 over DP2 (the norms'
   TP-replicated bucket sharded over DP), and PP2 interleaved (2 virtual stages, the tied embedding at both pipeline
   ends) x ZeRO-1 over DP2, staged to host memory as an asynchronous save is. The ranks' pieces together hold every
   element of every logical tensor once, and the step folder, read back whole by DCP in one process, holds every
   rank's own weights and gathered moments (every holder's, not only the writer's).
2. Each checkpoint loads into two other layouts (other TP, PP, DP and ZeRO-1 shard boundaries): every rank's weights
   and moments (gathered) equal the saved logical tensors' slices, bit for bit, and every AdamW piece has its state
   with the saved step. The first of them saves again: the same tensors, bit for bit, as the original folder.
3. A rank with nothing to write (one parameter, three keys, four ranks) still takes part in the save and the load.
4. A trainable parameter the optimizer holds no moments for fails the save on every rank with one line (only the
   rank assigned those moments finds them missing).
The file takes ~20 s on 2 cores. And in one process: frozen parameters (weights saved, no moments) in a plain AdamW resume
bit for bit against the uninterrupted run.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from nanotronix.distributed import shutdown_and_exit

from checkpoint_helpers import adamw, load_single, plain_model, save_single, train_steps
from helpers import start_gloo_ranks

WORLD = 4
MOMENTS = ("exp_avg", "exp_avg_sq")
# name -> ParallelConfig fields (where dp is left out, it is what tp x pp leave of the four ranks)
SAVES = {"zero1_dp4": {"dp": 4, "zero_stage": 1},
         "tp2_sp_zero1_dp2": {"tp": 2, "sequence_parallel": True, "dp": 2, "zero_stage": 1},
         "pp2_interleaved_zero1_dp2": {"pp": 2, "pp_schedule": "interleaved", "virtual_stages": 2, "dp": 2,
                                       "zero_stage": 1}}
LOADS = {"zero1_dp4": ["tp2_pp2", "pp2_interleaved_zero1_dp2"],
         "tp2_sp_zero1_dp2": ["zero1_dp4", "pp4"],
         "pp2_interleaved_zero1_dp2": ["tp2_sp_zero1_dp2", "tp2_pp2"]}
LAYOUTS = {**SAVES, "tp2_pp2": {"tp": 2, "pp": 2}, "pp4": {"pp": 4}}


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every logical tensor of a step folder, read by DCP in this process alone."""
    from nanotronix.checkpoint.storage import Collective, dcp_metadata

    stored = dcp_metadata(folder).state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items() if hasattr(m, "size")}
    Collective(single_process=True).load(state, folder)
    return state


def tp_local(full: torch.Tensor, param, ctx) -> torch.Tensor:
    dim = getattr(param, "tp_shard_dim", None)
    return full if dim is None or ctx.tp == 1 else full.chunk(ctx.tp, dim)[ctx.tp_rank]


def build(name: str, seed: int):
    from dist_common import make_config

    from nanotronix.model import build_model
    from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
    from nanotronix.train.optimizer import param_groups

    cfg = make_config(LAYOUTS[name])  # small gradient buckets: several per rank
    ctx = ParallelContext.build(cfg)
    torch.manual_seed(seed)
    model = parallelize(build_model(cfg.model, "sdpa"), ctx, cfg)
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.1), lr=1e-3, betas=(0.9, 0.95),
                               eps=1e-8)
    return cfg, ctx, model, opt


def assert_holds(saved: dict[str, torch.Tensor], model, opt, ctx, what: str) -> None:
    """This rank's weights and gathered moments are the TP-local slices of the saved logical tensors."""
    states = opt.param_states()
    for n, p in model.named_parameters():
        assert torch.equal(tp_local(saved[f"model.{n}"], p, ctx), p.detach()), (what, ctx.rank, n)
        for k in MOMENTS:
            assert torch.equal(tp_local(saved[f"optim.{k}.{n}"], p, ctx), states[n][k]), (what, ctx.rank, n, k)


def assert_each_chunk_once(snap, ctx, coll, model, what: str) -> None:
    """The ranks' pieces together: no chunk twice, and every element of every logical tensor."""
    mine = [(key, piece.shard_dim, ctx.tp_rank if piece.shard_dim is not None else 0, piece.tensor.numel())
            for key, piece in snap.pieces.items()]
    held = [entry for entries in coll.all_gather(mine) for entry in entries]
    assert len({entry[:3] for entry in held}) == len(held), f"{what}: a chunk collected twice"
    collected: dict[str, int] = {}
    for key, _, _, numel in held:
        collected[key] = collected.get(key, 0) + numel
    logical = {}
    for n, p in model.named_parameters():  # this rank's names, at their logical size
        size = p.numel() * (ctx.tp if getattr(p, "tp_shard_dim", None) is not None and ctx.tp > 1 else 1)
        logical.update({f"model.{n}": size, **{f"optim.{k}.{n}": size for k in MOMENTS}})
    assert all(collected.get(k) == v for k, v in logical.items()), f"{what}: elements missing or doubled"


def _resharded_optimizer(rank: int, root: Path) -> None:
    from dist_common import make_data, rank_batch

    from nanotronix.checkpoint.staging import HostStaging
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import load_training_state, take_snapshot, write_snapshot
    from nanotronix.train.step import train_step

    coll = Collective(dist.new_group(backend="gloo"))
    for name in SAVES:
        cfg, ctx, model, opt = build(name, seed=0)
        data = make_data(cfg)
        for step in (1, 2, 3):
            train_step(model, opt, rank_batch(cfg, data, step, ctx.dp_rank, ctx.dp), lr=1e-3, clip_grad=1.0)
        staging = HostStaging() if name.startswith("pp2") else None  # as an asynchronous save collects
        snap = take_snapshot(3, model, opt, ctx, cfg.to_dict(), {"consumed_samples": 24}, staging=staging, coll=coll)
        assert_each_chunk_once(snap, ctx, coll, model, name)
        folder = write_snapshot(snap, root / name, coll)
        saved = read_all(folder)
        assert_holds(saved, model, opt, ctx, f"saved {name}")

        for i, target in enumerate(LOADS[name]):
            _, lctx, lmodel, lopt = build(target, seed=5)  # other weights: nothing passes by accident
            load_training_state(folder, lmodel, lopt, lctx, coll, tied=True)
            assert lopt.step_count == 3
            for piece in lopt.pieces:
                assert float(lopt.inner.state[piece.tensor]["step"]) == 3.0, (name, target, rank)
            assert_holds(saved, lmodel, lopt, lctx, f"{name} -> {target}")
            if i == 0:  # saved again from the other layout: the same logical tensors
                again = take_snapshot(3, lmodel, lopt, lctx, cfg.to_dict(), {"consumed_samples": 24}, staging=None,
                                      coll=coll)
                resaved = read_all(write_snapshot(again, root / f"{name}-{target}", coll))
                assert resaved.keys() == saved.keys()
                assert all(torch.equal(resaved[k], saved[k]) for k in saved), (name, target)


def _a_rank_with_nothing_to_write(rank: int, root: Path) -> None:
    from nanotronix.checkpoint.staging import HostStaging
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import load_training_state, take_snapshot, write_snapshot
    from nanotronix.parallel import ParallelContext

    coll = Collective(dist.new_group(backend="gloo"))
    ctx = ParallelContext(tp=1, pp=1, dp=WORLD, rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=False)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    snap = take_snapshot(1, model, opt, ctx, {"model": {"tie_word_embeddings": False}}, {"consumed_samples": 1},
                         staging=HostStaging(), coll=coll)
    counts = coll.all_gather(len(snap.pieces))
    assert sorted(counts) == [0, 1, 1, 1], counts  # three keys, four holders: one writes nothing
    folder = write_snapshot(snap, root / "one_parameter", coll)
    fresh = torch.nn.Linear(4, 3, bias=False)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    load_training_state(folder, fresh, fresh_opt, ctx, coll, tied=False)
    assert torch.equal(fresh.weight, model.weight)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh_opt.state[fresh.weight][k], opt.state[model.weight][k]), k


def _a_parameter_without_moments(rank: int) -> None:
    """A trainable parameter left out of the optimizer: only the rank assigned its moments finds them missing; every
    rank raises the same one line (every_rank) from the snapshot, none goes on into the write to wait for it there."""
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import take_snapshot
    from nanotronix.parallel import ParallelContext

    coll = Collective(dist.new_group(backend="gloo"))
    ctx = ParallelContext(tp=1, pp=1, dp=WORLD, rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW([model.weight])  # the bias is trainable, but not the optimizer's
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    try:
        take_snapshot(1, model, opt, ctx, {"model": {"tie_word_embeddings": False}}, {"consumed_samples": 1},
                      staging=None, coll=coll)
        said = None
    except Exception as e:
        said = (type(e).__name__, getattr(e, "every_rank", False), str(e))
    everyone = coll.all_gather(said)  # without the shared check only the bias's writer raised, the others went on
    assert everyone == [("CheckpointError", True, "cannot save a checkpoint: the optimizer holds no state for "
                         "trainable parameter bias (made trainable after the optimizer was built, or left out of "
                         "it?)")] * WORLD, everyone


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _resharded_optimizer(rank, Path(root))
        _a_rank_with_nothing_to_write(rank, Path(root))
        _a_parameter_without_moments(rank)
    finally:
        dist.destroy_process_group()
    # gloo's exit-time abort after DTensor collectives ("terminate called without an active exception", about
    # one exit in ten under load): skip the interpreter's teardown once the work passed
    shutdown_and_exit(0)


def test_distributed_optimizer_moments_reshard_bit_for_bit(tmp_path):
    # A failing assertion in any rank raises here, with that rank's traceback.
    start_gloo_ranks(_worker, WORLD, str(tmp_path))


def test_frozen_parameters_are_saved_without_moments_and_resume_bit_for_bit(tmp_path):
    """A frozen parameter has weights but no AdamW state (`save_chunks`, `add_optimizer_targets` and the optimizer's
    `param_states(names)` / `load_groups` skip it alike); the optimizer holds it all the same (torch skips parameters
    without a gradient). The reference: the same run, not interrupted."""
    frozen = {"norm.weight", "layers.1.mlp.down_proj.weight"}

    def build(seed: int):
        model = plain_model(seed=seed)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        return model, adamw(model)  # every parameter, the frozen ones included

    model, opt = build(0)
    train_steps(model, opt, range(1, 3))
    folder = save_single(tmp_path / "run", 2, model, opt)
    stored = set(read_all(folder))
    assert {f"model.{n}" for n in frozen} <= stored
    assert not {f"optim.{k}.{n}" for n in frozen for k in MOMENTS} & stored
    train_steps(model, opt, range(3, 5))  # the uninterrupted run

    resumed, resumed_opt = build(5)  # other weights, the frozen ones too: the checkpoint's must come back
    load_single(folder, resumed, resumed_opt)
    train_steps(resumed, resumed_opt, range(3, 5))
    want = dict(model.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, want[name]), name
        assert (p in resumed_opt.state) == (name not in frozen), name
        for k in resumed_opt.state.get(p, {}):
            assert torch.equal(resumed_opt.state[p][k], opt.state[want[name]][k]), (name, k)


def test_the_writers_are_assigned_at_the_first_save_and_again_only_when_the_chunks_change():
    """`state.WriterPlan` (a run's Checkpointer keeps one): a later save gathers each rank's digest only, not every
    rank's key list, and takes the first save's assignment; chunks that changed (here a parameter frozen, its moments
    no longer saved) are assigned anew. The reference: `assign_writers` of a fresh gather."""
    from nanotronix.checkpoint.state import WriterPlan, assign_writers, save_chunks

    class OneRank:  # the one rank of a collective, noting what each gather carries
        rank = 0

        def __init__(self):
            self.gathered = []

        def all_gather(self, obj):
            self.gathered.append(type(obj).__name__)
            return [obj]

    model, coll, plan = plain_model(), OneRank(), WriterPlan()
    first = plan.keys(model, 1, 0, coll)
    assert first == assign_writers([save_chunks(model, 1, 0)])[0] and coll.gathered == ["str", "dict"]
    coll.gathered.clear()
    assert plan.keys(model, 1, 0, coll) == first and coll.gathered == ["str"]
    model.norm.weight.requires_grad_(False)
    coll.gathered.clear()
    again = plan.keys(model, 1, 0, coll)
    assert coll.gathered == ["str", "dict"] and again == first - {f"optim.{k}.norm.weight" for k in MOMENTS}
