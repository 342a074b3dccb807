"""Resharded resume: save in one TP x PP x DP layout, continue in any other. One start of eight gloo ranks runs:

1. The checkpoint layer, bit for bit: the ranks hold the pieces of one tiny plain model and of reference AdamW
   moments, cut as `nanotronix.parallel` cuts them (tied and untied embeddings). The checkpoint saved in
   TP2xPP2xDP2 is loaded into TP1xPP1xDP1, TP2xPP1xDP4, TP1xPP4xDP2 and TP2xPP2xDP2, those saved in TP2xPP1xDP4
   and TP1xPP4xDP2 back into other layouts, and every rank checks its weights and moments against the reference.
   The checkpoints of three layouts are then exported to Hugging Face: `transformers` must reproduce the plain
   model's logits (fp32, 1e-5).
2. The real trainer (`nanotronix.train.trainer.train`, i.e. parallelize + DistributedOptimizer + Checkpointer):
   2 steps in TP2xPP2xDP2, resumed to step 4 in TP2xPP1xDP4 with ZeRO-1 (saving every step in the background,
   right after the update, while ZeRO-1's overlapped weight gathers run), to 5 in TP1xPP4xDP2, to 6 back in
   TP2xPP2xDP2 with ZeRO-1; and from the first checkpoint to step 3 in one process. Every step's loss is within
   rel 1e-5 of an uninterrupted single-process run, and its learning rate equal.
The file takes ~35 s on 2 cores (~50 CPU-s), the ranks forked from a process that imported torch and the trainer
once (helpers.start_gloo_ranks; spawned, each imported them itself: 88 CPU-s instead of 56 for the three files
that start ranks so).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nanotronix.distributed import shutdown_and_exit

from checkpoint_helpers import (TINY, TINY_UNTIED, FakeOptimizer, local_slice, plain_model, rank_piece,
                                read_metrics, reference_moments, train_in_process)
from helpers import start_gloo_ranks, tiny_config, write_learnable_store

WORLD = 8
SAVE_LAYOUTS = [(2, 2, 2), (2, 1, 4), (1, 4, 2)]  # (tp, pp, dp)
LOAD_CASES = [("2x2x2", (1, 1, 1)), ("2x2x2", (2, 1, 4)), ("2x2x2", (1, 4, 2)), ("2x2x2", (2, 2, 2)),
              ("2x1x4", (2, 2, 2)), ("1x4x2", (2, 1, 4))]


def _name(layout) -> str:
    return "x".join(map(str, layout))


_CONTEXTS: dict = {}


def _context(cfg_model, layout):
    """The ParallelContext of `layout` over all 8 ranks; built once per process (group creation is collective,
    and every rank asks for the layouts in the same order)."""
    from nanotronix.config import Config, ParallelConfig
    from nanotronix.parallel import ParallelContext

    if layout not in _CONTEXTS:
        tp, pp, dp = layout
        cfg = Config(model=cfg_model, parallel=ParallelConfig(tp=tp, pp=pp, dp=dp))
        cfg.train.seq_len = 32
        _CONTEXTS[layout] = ParallelContext.build(cfg)
    return _CONTEXTS[layout]


def _piece(ctx, cfg_model, step_count):
    plain = plain_model(cfg_model)
    moments = reference_moments(plain)
    model = rank_piece(plain, cfg_model, ctx.tp, ctx.pp, ctx.tp_rank, ctx.pp_rank)
    states = {n: {k: local_slice(v, n, ctx.tp, ctx.tp_rank).clone() for k, v in moments[n].items()}
              for n, _ in model.named_parameters()}
    return model, FakeOptimizer(model, states, step_count), plain, moments


CONFIGS = {"tied": TINY, "untied": TINY_UNTIED}


# (run name, (tp, pp, dp), train_steps, resume from): each run continues the previous one in another layout.
TRAINER_CHAIN = [("2x2x2", (2, 2, 2), 2, None), ("2x1x4", (2, 1, 4), 4, "2x2x2"),
                 ("1x4x2", (1, 4, 2), 5, "2x1x4"), ("back", (2, 2, 2), 6, "1x4x2")]


def trainer_overrides(root: Path, name: str, steps: int, resume, tp: int = 1, pp: int = 1) -> list[str]:
    # micro-batch 1 everywhere: 1F1B over 4 stages needs 4 micro-batches (the global batch stays 8).
    out = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"train.train_steps={steps}", "train.micro_batch_size=1",
           f"checkpoint.dir={root / name / 'ckpt'}", f"logging.dir={root / name / 'logs'}",
           f"checkpoint.resume={root / resume / 'ckpt' if resume else 'none'}"]
    if name == "2x1x4":  # every step saved, in the background, while the 8 ranks train on
        out += ["checkpoint.interval=1", "checkpoint.async_save=true"]
    if name in ("2x1x4", "back"):  # ZeRO-1: sharded moments in and out, saves while the weight gathers run
        out += ["parallel.zero_stage=1"]
    return out


def _worker(rank: int, port: int, root: str, train_config: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name, cfg_model in CONFIGS.items():
            _save_and_reload(rank, Path(root) / name, cfg_model)
        for name, (tp, pp, _), steps, resume in TRAINER_CHAIN:
            train_in_process(train_config, *trainer_overrides(Path(root) / "train", name, steps, resume, tp, pp))
    finally:
        dist.destroy_process_group()
    # gloo's exit-time abort after DTensor collectives ("terminate called without an active exception", about
    # one exit in ten under load): skip the interpreter's teardown once the work passed
    shutdown_and_exit(0)


def _save_and_reload(rank: int, root: Path, cfg_model) -> None:
    from nanotronix.checkpoint.staging import HostStaging
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import load_training_state, take_snapshot, write_snapshot

    tied = cfg_model.tie_word_embeddings
    coll = Collective(dist.new_group(backend="gloo"))
    for layout in SAVE_LAYOUTS:
        ctx = _context(cfg_model, layout)
        model, opt, _, _ = _piece(ctx, cfg_model, step_count=7)
        snap = take_snapshot(7, model, opt, ctx, {"model": vars(cfg_model)}, {"consumed_samples": 56},
                             staging=HostStaging() if layout == (2, 1, 4) else None,  # one layout staged to CPU
                             coll=coll)
        _check_each_chunk_collected_once(snap, ctx, coll, plain_model(cfg_model), layout)
        write_snapshot(snap, Path(root) / _name(layout), coll)

    single = dist.new_group([0])  # collective: every rank creates it
    for source, layout in LOAD_CASES:
        folder = Path(root) / source / "step_0000007"
        if layout == (1, 1, 1):
            if rank != 0:
                dist.barrier()
                continue
            from nanotronix.parallel import ParallelContext
            ctx, load_coll = ParallelContext(tp=1, pp=1, dp=1, rank=0, world_size=1), Collective(single)
        else:
            ctx, load_coll = _context(cfg_model, layout), coll
        model, opt, plain, moments = _piece(ctx, cfg_model, step_count=0)
        with torch.no_grad():  # scramble what will be loaded, so nothing passes by accident
            for p in model.parameters():
                p.normal_()
        opt.states = {n: {k: torch.full_like(v, -1.0) for k, v in s.items()} for n, s in opt.states.items()}
        load_training_state(folder, model, opt, ctx, load_coll, tied=tied)
        reference = dict(plain.named_parameters())
        for n, p in model.named_parameters():
            want = local_slice(reference[n].detach(), n, ctx.tp, ctx.tp_rank)
            assert torch.equal(p.detach(), want), f"{source}->{layout} rank {rank}: weight {n} differs"
            for k in ("exp_avg", "exp_avg_sq"):
                want = local_slice(moments[n][k], n, ctx.tp, ctx.tp_rank)
                assert torch.equal(opt.states[n][k], want), f"{source}->{layout} rank {rank}: {k} of {n}"
        assert opt.step_count == 7
        if tied and model.lm_head is not None:
            assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
        if layout == (1, 1, 1):
            dist.barrier()


def _check_each_chunk_collected_once(snap, ctx, coll, plain, layout) -> None:
    """The ranks' snapshots together hold every element of every logical tensor exactly once: a replica (DP, a
    TP-replicated norm, the tied embedding at both pipeline ends) is collected, and staged, by one rank only."""
    mine = [(key, piece.shard_dim, ctx.tp_rank if piece.shard_dim is not None else 0, piece.tensor.numel())
            for key, piece in snap.pieces.items()]
    held = [entry for entries in coll.all_gather(mine) for entry in entries]
    chunks = [entry[:3] for entry in held]
    assert len(chunks) == len(set(chunks)), f"{layout}: a chunk collected twice"
    collected: dict[str, int] = {}
    for key, _, _, numel in held:
        collected[key] = collected.get(key, 0) + numel
    logical = {}
    for fqn, p in plain.named_parameters():
        logical.update({f"model.{fqn}": p.numel(), f"optim.exp_avg.{fqn}": p.numel(),
                        f"optim.exp_avg_sq.{fqn}": p.numel()})
    assert collected == logical, f"{layout}: collected elements differ from the logical tensors'"


@pytest.fixture(scope="module")
def saved_layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    store = write_learnable_store(root / "store" / "arith")
    (root / "train").mkdir()
    train_config = tiny_config(root / "train", store)
    # A failing assertion in any rank raises here, with that rank's traceback.
    start_gloo_ranks(_worker, WORLD, str(root), str(train_config))
    return root


@pytest.mark.parametrize("config", CONFIGS)
def test_every_layout_loads_every_other(saved_layouts, config):
    # The workers asserted the loads; here: every saved checkpoint records its layout.
    for layout in SAVE_LAYOUTS:
        manifest = json.loads((saved_layouts / config / _name(layout) / "step_0000007" / "checkpoint.json")
                              .read_text())
        tp, pp, dp = layout
        assert manifest["layout"] == {"tp": tp, "pp": pp, "dp": dp, "world_size": WORLD}
        assert manifest["step"] == 7 and manifest["rope_layout"] == "rotate_half"


@pytest.mark.parametrize("config, layout", [("tied", layout) for layout in SAVE_LAYOUTS] + [("untied", (1, 4, 2))],
                         ids=lambda v: v if isinstance(v, str) else _name(v))
def test_export_from_each_layout_matches_transformers(saved_layouts, config, layout, tmp_path):
    import transformers

    from nanotronix.checkpoint.hf_export import export_to_hf

    cfg = CONFIGS[config]
    out = export_to_hf(saved_layouts / config / _name(layout), tmp_path / "hf", progress=False,
                       log=lambda _: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = plain_model(cfg)(ids)
        theirs = hf(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_trainer_continues_in_every_layout(saved_layouts, capsys):
    runs = saved_layouts / "train"
    config = runs / "config.yaml"
    train_in_process(config, *trainer_overrides(runs, "reference", 6, None))
    train_in_process(config, *trainer_overrides(runs, "single", 3, "2x2x2"))
    assert "RNG freshly seeded (saved in layout" in capsys.readouterr().out  # another layout: fresh RNG
    expected = read_metrics(runs / "reference" / "logs")
    chain = [(name, steps, resume) for name, _, steps, resume in TRAINER_CHAIN] + [("single", 3, "2x2x2")]
    for name, steps, resume in chain:
        got = read_metrics(runs / name / "logs")
        start = 1 if resume is None else max(read_metrics(runs / resume / "logs")) + 1
        assert sorted(got) == list(range(start, steps + 1)), name
        for step in got:
            assert got[step]["lr"] == expected[step]["lr"]
            assert abs(got[step]["loss"] - expected[step]["loss"]) <= 1e-5 * abs(expected[step]["loss"]), \
                (name, step, got[step]["loss"], expected[step]["loss"])
