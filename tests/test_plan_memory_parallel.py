"""tools/plan.py's per-GPU memory (tools/_plan_memory.py) under pipeline schedules and data parallelism against what
each rank keeps, on CPU.

One torchrun launch of 4 gloo ranks (tests/dist_plan_memory.py, ~40 s on 2 cores) runs a training step of
tests/test_plan_memory.py's model (8 layers, bf16) in each layout below, the second under `LiveStorages`, and
records per rank: the most micro-batches in flight (forwards whose backward has not run), the most activation bytes
alive outside the backward passes, the bf16 weight copies, the buffers the pipeline stages keep, and the gradient,
optimizer and weight buffers. The layouts: 1F1B, AFAB and interleaved 1F1B on 4 pipeline ranks with fewer
micro-batches than ranks, a count that is not a multiple of them, one round and two; interleaved with 4 virtual
stages on 2 ranks; 1F1B on 2 ranks of tp 2 with sequence parallelism (also with the fused loss, and with
selective recompute and the fused loss); full recompute on 2 pipeline ranks; ZeRO-1 and not over 2 data-parallel
ranks.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_common import parse_layout
from dist_plan_memory import layout_config
from helpers import torchrun
from test_plan_memory import SEQ, TOKENS, rope_tables

WORKER = str(Path(__file__).resolve().parent / "dist_plan_memory.py")
WORLD = 4
LAYOUTS = {
    "1f1b": "pp=4,train.global_batch_size=6",
    "afab_fused_loss": "pp=4,pp_schedule=afab,train.global_batch_size=2,train.loss_chunk_size=128",
    "afab": "pp=4,pp_schedule=afab,train.global_batch_size=5",
    "interleaved_under_pp": "pp=4,pp_schedule=interleaved,virtual_stages=2,train.global_batch_size=2",
    "interleaved_one_round": "pp=4,pp_schedule=interleaved,virtual_stages=2,train.global_batch_size=6",
    "interleaved_two_rounds": "pp=4,pp_schedule=interleaved,virtual_stages=2,train.global_batch_size=8",
    "interleaved_4_virtual": "pp=2,pp_schedule=interleaved,virtual_stages=4,train.global_batch_size=8",
    "tp_sequence_parallel": "tp=2,pp=2,sequence_parallel=true,train.global_batch_size=4",
    "tp_sequence_parallel_selective": "tp=2,pp=2,sequence_parallel=true,train.global_batch_size=4,"
                                      "train.recompute=selective,train.loss_chunk_size=128",
    "tp_sequence_parallel_fused_loss": "tp=2,pp=2,sequence_parallel=true,train.global_batch_size=4,"
                                      "train.loss_chunk_size=128",
    "full_recompute": "pp=2,train.global_batch_size=4,train.recompute=full",
    "zero0": "pp=2,train.global_batch_size=4",
    "zero1": "pp=2,zero_stage=1,train.global_batch_size=4",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """layout -> its ranks' records, in global rank order."""
    out = tmp_path_factory.mktemp("plan_memory")
    proc = torchrun(WORLD, [WORKER, "--out", str(out), *(f"{n}:{s}" for n, s in LAYOUTS.items())], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(WORLD)] for name in LAYOUTS}


def config(name: str):
    return layout_config(parse_layout(f"{name}:{LAYOUTS[name]}")[1])


def data_parallel(cfg) -> int:
    return WORLD // (cfg.parallel.pp * cfg.parallel.tp)


@pytest.mark.parametrize("name", LAYOUTS)
def test_micro_batches_in_flight_are_the_plans(plan_memory, runs, name):
    cfg = config(name)
    for r in runs[name]:
        assert r["peak_in_flight"] == plan_memory.in_flight_microbatches(cfg, r["accum"], r["coords"]["pp"]), r


@pytest.mark.parametrize("name", LAYOUTS)
def test_pipeline_stages_keep_a_buffer_per_micro_batch(runs, name):
    """torch's PipelineStage keeps, per micro-batch of the step, a buffer for the activations a chunk receives (all
    chunks but the model's first) and one for its output's gradient (all but the last), each a micro-batch's fp32
    residual stream, split over TP under sequence parallelism (tools/_plan_memory.py's `pipeline_buffer_bytes`, whose
    whole is held to the measurement below)."""
    cfg = config(name)
    p = cfg.parallel
    last = p.pp * p.virtual_stages - 1
    for r in runs[name]:
        ids = [v * p.pp + r["coords"]["pp"] for v in range(p.virtual_stages)]
        buffers = r["accum"] * sum((c > 0) + (c < last) for c in ids)
        residual = SEQ * 4 * cfg.model.hidden_size // (p.tp if p.sequence_parallel else 1)  # of one sequence
        assert r["kept_buffers"] == buffers * residual


def rebuilt_layer(plan_memory, cfg) -> float:
    """What the plan counts for the layer that a backward pass rebuilds under train.recompute (its set beyond what
    it keeps; measured in test_plan_memory.py). Outside the backward passes only the forward of the layer running
    holds a part of it, for a moment."""
    kept, full = plan_memory.activation_bytes_per_token_per_layer(cfg)
    return cfg.train.micro_batch_size * SEQ * (full - kept)


@pytest.mark.parametrize("name", LAYOUTS)
def test_nothing_a_step_makes_outlives_it(runs, name):
    """Beside the stages' buffers (above) a step leaves nothing alive behind it: no micro-batch's activations,
    outputs, logits or weight copies (the interleaved schedule's pending sends are waited at its end)."""
    assert [r["left_after_step"] for r in runs[name]] == [0] * WORLD


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_ranks_activations_are_the_plans(plan_memory, runs, name):
    """What a rank holds at its peak outside the backward passes, with the stages' buffers, against the plan's
    activations of that rank. Beside the plan's terms: the bf16 RoPE tables of every layer in flight
    (test_plan_memory.rope_tables), and tensors on their way: a gradient the schedule sent, a norm's intermediate
    while it runs, a few small ones (labels, log-sum-exps); at most 4 micro-batches' residual streams (each ~1% of
    a micro-batch's activations here, where a rank holds 2 layers of 256 tokens). With recomputation the plan's
    activations hold the set of the layer a backward rebuilds, of which the forward of a layer holds a part."""
    cfg = config(name)
    dp = data_parallel(cfg)
    residual = SEQ * 4 * cfg.model.hidden_size
    for r in runs[name]:
        rank, accum = r["coords"]["pp"], r["accum"]
        planned = plan_memory.stage_memory(cfg, dp, accum, rank)
        # the tables: per layer and sequence
        rope = r["peak_in_flight"] * r["layers"] * TOKENS * rope_tables("bfloat16", cfg.train.recompute)
        rebuilt = rebuilt_layer(plan_memory, cfg)
        beside = r["peak_activations"] + r["kept_buffers"] - (planned["activations"] - rebuilt + rope)
        assert 0 <= beside <= 4 * residual + rebuilt, (r, beside / residual)
        assert r["params"] == planned["params"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_ranks_weight_copies_are_the_plans(plan_memory, runs, name):
    """Autocast's bf16 weight copies alive after a forward: every decoder layer's per forward in flight, the head's
    per loss awaiting its backward on the last stage (the fused loss's copy lives only while the loss runs: the plan
    counts it, measured apart in test_plan_memory.py), none of the embedding's or the norms'."""
    cfg = config(name)
    v, d = cfg.model.vocab_size, cfg.model.hidden_size
    for r in runs[name]:
        rank = r["coords"]["pp"]
        planned = plan_memory.stage_memory(cfg, data_parallel(cfg), r["accum"], rank)["weights_bf16_copies"]
        fused_head = 2 * v * d / cfg.parallel.tp if rank == cfg.parallel.pp - 1 and cfg.train.loss_chunk_size else 0
        # with recomputation the plan counts the copies of the one layer its backward rebuilds
        rebuilt = 2 * plan_memory.layer_linear_params(cfg) if cfg.train.recompute != "none" else 0
        assert r["peak_weight_copies"] + fused_head + rebuilt == planned, r


@pytest.mark.parametrize("name", ["zero0", "zero1"])
def test_data_parallel_state_is_the_plans(plan_memory, runs, name):
    """Per rank: fp32 weights and gradient buffers of 4 bytes per parameter (each parameter starts 256-byte aligned
    in its bucket: a little padding), AdamW's two fp32 moments of 8 bytes per parameter, over dp with ZeRO-1."""
    cfg = config(name)
    dp = data_parallel(cfg)
    for r in runs[name]:
        planned = plan_memory.stage_memory(cfg, dp, r["accum"], r["coords"]["pp"])
        assert r["weight_bytes"] == pytest.approx(planned["weights_fp32"], rel=0.002)
        assert r["grad_bytes"] == pytest.approx(planned["grads_fp32"], rel=0.002), r
        assert r["optimizer_bytes"] == pytest.approx(planned["optimizer_adamw"], rel=0.002)
    assert runs["zero1"][0]["optimizer_bytes"] == pytest.approx(runs["zero0"][0]["optimizer_bytes"] / 2, rel=0.002)


@pytest.mark.parametrize("name", ["zero0", "zero1"])
def test_the_update_keeps_nothing_beside_the_state(runs, name):
    """The optimizer's update leaves nothing alive beside the weights, gradients and moments above, also while
    ZeRO-1's weight all-gathers it started run behind the next forward: each gathers a bucket in place (this
    rank's updated shard is its input, at its place in the output), not from a copy of the shard (4 / dp bytes per
    parameter, which the plan does not count)."""
    assert [r["left_by_update"] for r in runs[name]] == [0] * WORLD
