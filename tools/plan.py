#!/usr/bin/env python
"""Plan a run before launching it: per data stage its steps, tokens and each source's epochs, memory per GPU for
the layout, and projected wall-clock and GPU-hours at a stated MFU.

    python tools/plan.py CONFIG --gpus N [--mfu 0.45] [--gpu "H100 SXM"] [--net-gbps 400] [--gpus-per-node 8]
                         [--json] [dotted.key=value ...]

Data: the per-source sample counts come from the sampler's own blend arithmetic (`nanotronix.data.blend`), so
they are what the run will read, exactly; epochs need each store's token count, so a store that cannot be opened
is reported as "store not found" (point the recipe at your corpus with data.root=...).

Memory (per GPU, the most loaded pipeline stage): fp32 weights (they are their own master copy) and fp32 gradients,
AdamW's two fp32 moments (divided over DP with ZeRO-1), bf16 weight copies made by autocast (held until the
micro-batch's backward; once per step with train.bf16_weight_cache; the decoder layers' one layer at a time with
train.recompute; none of the embedding, whose lookup reads the fp32 weight), and activations: the tensors one
Llama block keeps for backward with flash/memory-efficient attention (fewer with train.recompute), times the
rank's layers (the trainer's partition: the head counts, so the first ranks may hold more) and the micro-batches
it holds at once (1 without pipelining; with 1F1B pp on the first rank, 1 on the last; all on every rank with
AFAB; interleaved: pp + (pp-1)/virtual_stages on the first, all with fewer than 2 pp micro-batches), plus the last
stage's final norm and logits (bf16, their fp32 copy and log-softmax for the loss; one chunk with
train.loss_chunk_size; with AFAB every micro-batch's loss keeps its log-softmax or the fused loss's dW and dX),
and the pipeline stages' receive buffers (one per micro-batch of the step, kept).
Allocator fragmentation, NCCL buffers, the backward's passing gradients and the CUDA context (~1-3 GiB together)
come on top. An estimate, not a measurement; tests/test_plan_memory.py holds its terms to what the model keeps on
CPU, tests/test_plan_memory_parallel.py those of pipeline and data-parallel layouts. The activations are what
eager PyTorch keeps: a layer compiled by train.compile keeps less (what AOTAutograd's partitioner saves: 69% of it
on the tests' model, 61% at tp 2 with SP; tests/test_plan_memory_compiled.py), so under train.compile they are an
upper bound.

Checkpoints: the saves the run makes (checkpoint.interval, its milestones, the last step), how many stay on disk
at its end under keep_last / keep_every / keep_steps, and their size (12 bytes per parameter: fp32 weights and
AdamW's two moments).

A run that starts from another run's step (checkpoint.resume naming a step folder: a branch such as
smollm2_1p7b_anneal_math.yaml) is planned from that step: its time and saves count only the steps it trains.

Time: total tokens x model FLOPs per token (`nanotronix.train.flops`, the trainer's own MFU counter) / (GPUs x peak
x MFU). `--gpu` picks the peak from the same table the trainer uses (`nanotronix.train.gpus`).

Data-parallel traffic (per GPU and step, an estimate): the fp32 gradient reduction of the GPU's parameters over its
DP group, as NCCL's ring moves it: all-reduce 2 (dp-1)/dp x 4 bytes per parameter (2 with
parallel.grad_reduce_dtype bfloat16); ZeRO-1 the same in two halves, a reduce-scatter and the all-gather of the
updated weights (fp32; the decoder linears' in bf16 with train.bf16_weight_cache). Ranks are numbered tp fastest,
then dp, so a DP group spans tp x dp consecutive ranks: within one node of `--gpus-per-node` it rides the
node's link of `--gpu` (NVLink, 450 GB/s per GPU and direction on H100 SXM; PCIe for the PCIe cards), across nodes
each GPU's own network link (`--net-gbps`, 400 Gb/s: one ConnectX-7 per GPU as in a DGX H100). The trainer hides
it behind compute: the gradient reduction behind the backward of the step's last micro-batch (~2/3 of its compute),
ZeRO-1's weight gather behind the next step's first forward (~1/3, with parallel.overlap_param_gather); what sticks
out lengthens the step and lowers the MFU the run can reach.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import ArgumentParser, finite_float, integer, one_line_errors, user_path
from nanotronix.errors import fail
from nanotronix.train.gpus import GPUS
from _plan_memory import layer_linear_params, memory_plan  # beside this file: the per-GPU memory model


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="tools/plan.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=user_path, metavar="CONFIG", help="run config (YAML)")
    parser.add_argument("--gpus", type=integer, required=True, help="GPUs (processes) in the run")
    parser.add_argument("--mfu", type=finite_float, default=0.45, help="model FLOPs utilisation to project with "
                                                                "(default 0.45)")
    parser.add_argument("--gpu", default="H100 SXM", help='GPU model for the peak FLOP/s (default "H100 SXM")')
    parser.add_argument("--net-gbps", type=finite_float, default=400.0,
                        help="network bandwidth per GPU between nodes, Gbit/s per direction (default 400)")
    parser.add_argument("--gpus-per-node", type=integer, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # default=[]: without one, argparse counts a "*" positional as required and a missing CONFIG read "required:
    # CONFIG, dotted.key=value", as if overrides had to be given
    parser.add_argument("overrides", nargs="*", default=[], metavar="dotted.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)  # overrides may follow the options


# ---------------------------------------------------------------------------------------------- data stages

def store_tokens(path: str) -> tuple[Optional[int], str]:
    """(token count, status) of the store at `path`; (None, reason) when it cannot be opened."""
    from nanotronix.data import DataError, open_store

    try:
        return open_store(os.path.expanduser(path)).num_tokens, "ok"
    except DataError as e:
        return None, "store not found" if "not found" in str(e) else f"store unreadable: {e}"


def stage_plan(cfg) -> list[dict[str, Any]]:
    """Steps, tokens and per-source samples/tokens/epochs of every stage, with the sampler's arithmetic."""
    from nanotronix.data import DataError
    from nanotronix.data.blend import BlendTree
    from nanotronix.data.schedule import PackedStream, require_stages

    require_stages(cfg.data.stages)  # the preflight's refusal: a plan with no stage printed a whole plan
    t = cfg.train
    gbs, seq, steps = t.global_batch_size, t.seq_len, t.train_steps
    tokens_per_step = gbs * seq
    sizes: dict[str, tuple[Optional[int], str]] = {}
    seen_samples: dict[str, int] = {}  # per source, over the stages so far (a source continues across stages)
    stages = cfg.data.stages
    out = []
    for k, stage in enumerate(stages):
        first = 1 if k == 0 else stage.start_step
        last = (stages[k + 1].start_step - 1) if k + 1 < len(stages) else steps
        last = min(last, steps)
        n_steps = max(0, last - first + 1)
        samples = n_steps * gbs
        tree = BlendTree([ds.weight for ds in stage.datasets])
        counts = tree.counts(samples)
        total_weight = sum(ds.weight for ds in stage.datasets)
        sources = []
        for ds, count in zip(stage.datasets, counts):
            if ds.path not in sizes:
                sizes[ds.path] = store_tokens(ds.path)
            num_tokens, status = sizes[ds.path]
            seen_samples[ds.path] = seen_samples.get(ds.path, 0) + count
            epochs = epochs_after = None
            if num_tokens is not None:
                try:  # the sampler's own epoch arithmetic (windows of seq_len+1 tokens per epoch)
                    stream = PackedStream(ds.path, num_tokens, seq, cfg.data.data_seed)
                    epochs, epochs_after = stream.epochs(count), stream.epochs(seen_samples[ds.path])
                except DataError as e:
                    status = f"store too small: {e}"
            sources.append({"path": ds.path, "weight": ds.weight, "share": ds.weight / total_weight,
                            "samples": count, "tokens": count * seq, "store_tokens": num_tokens, "status": status,
                            "epochs": epochs, "epochs_by_stage_end": epochs_after})
        out.append({"name": stage.name, "first_step": first, "last_step": last, "steps": n_steps,
                    "tokens": n_steps * tokens_per_step, "tokens_before": (first - 1) * tokens_per_step,
                    "sources": sources})
    return out


# ----------------------------------------------------------------------------------------------------- time

def resumed_step(cfg) -> int:
    """The step a run starts after: the one `checkpoint.resume` names when it is a step folder (a branch off another
    run, e.g. smollm2_1p7b_anneal_math.yaml), else 0. Its earlier steps were trained by that other run."""
    from nanotronix.checkpoint.checkpointer import check_steps_left
    from nanotronix.checkpoint.paths import step_of

    resume = cfg.checkpoint.resume.strip()
    step = 0 if resume in ("auto", "none") else step_of(Path(resume)) or 0
    check_steps_left(step, cfg.train.train_steps)  # the trainer's refusal: a plan of negative steps said nothing
    return step


def time_plan(cfg, gpus: int, mfu: float, gpu: str, stages: list[dict], start: int = 0) -> dict[str, Any]:
    """Compute time of the steps after `start` (`resumed_step`), in all and per stage."""
    from nanotronix.train.flops import flops_per_token

    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r} is not in the GPU table ({', '.join(GPUS)})")
    peak = GPUS[gpu].peak_tflops[cfg.train.dtype]
    per_token = flops_per_token(cfg.model, cfg.train.seq_len)
    step_tokens = cfg.train.global_batch_size * cfg.train.seq_len
    tokens = (cfg.train.train_steps - start) * step_tokens
    rate = gpus * peak * 1e12 * mfu  # model FLOP/s of the whole run

    def hours(n_tokens: int) -> float:
        return n_tokens * per_token / rate / 3600

    return {"gpu": gpu, "dtype": cfg.train.dtype, "peak_tflops": peak, "mfu": mfu, "flops_per_token": per_token,
            "total_tokens": tokens, "total_flops": tokens * per_token,
            "tokens_per_sec_per_gpu": peak * 1e12 * mfu / per_token,
            "wall_hours": hours(tokens), "gpu_hours": hours(tokens) * gpus,
            "stage_wall_hours": {s["name"]: hours(max(0, s["last_step"] - max(s["first_step"], start + 1) + 1)
                                                  * step_tokens) for s in stages}}


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoint_plan(cfg, start: int = 0) -> dict[str, Any]:
    """The saves a run makes after `start` (`resumed_step`; every checkpoint.interval steps, its milestones, the last
    step) and what is left on disk at its end under the retention settings (the checkpointer's own `Retention`). A
    step holds the fp32 weights and AdamW's two fp32 moments of every parameter (~12 bytes each; RNG states and the
    manifest are small)."""
    from nanotronix.checkpoint.paths import Retention

    c, steps = cfg.checkpoint, cfg.train.train_steps
    keep = Retention.of(c)
    saved = set(range(c.interval, steps + 1, c.interval)) if c.interval > 0 else set()
    saved |= {s for s in c.keep_steps if s <= steps}
    if c.keep_every > 0:
        saved |= set(range(c.keep_every, steps + 1, c.keep_every))
    saved = sorted(s for s in saved | {steps} if s > start)  # a branch off another run saves only its own steps
    kept = saved if c.keep_last == 0 else sorted(set(saved[-c.keep_last:]) | {s for s in saved if keep.milestone(s)})
    step_bytes = 12 * cfg.model.num_parameters()
    return {"saves": len(saved), "kept": len(kept), "milestones_kept": sum(keep.milestone(s) for s in kept),
            "bytes_per_checkpoint": step_bytes, "bytes_kept": step_bytes * len(kept)}


# ------------------------------------------------------------------------------------- data-parallel traffic

def comm_plan(cfg, dp: int, accum: int, params_per_gpu: float, time: dict, net_gbps: float,
              gpus_per_node: int) -> dict[str, Any]:
    """The DP gradient traffic of one step and how much of it compute cannot hide (module docstring)."""
    p = cfg.parallel
    grad_bytes = 2 if p.grad_reduce_dtype == "bfloat16" else 4
    ring_grads = (dp - 1) / dp * grad_bytes * params_per_gpu  # one ring pass over the gradients
    # ... and over the weights (ZeRO-1's all-gather): fp32, except the decoder linears' in bf16 under
    # train.bf16_weight_cache (gathered into their bf16 copies)
    bf16_weights = layer_linear_params(cfg) * math.ceil(cfg.model.num_hidden_layers / p.pp) \
        if cfg.train.bf16_weight_cache else 0.0
    ring = (dp - 1) / dp * (4 * (params_per_gpu - bf16_weights) + 2 * bf16_weights)
    crosses_nodes = p.tp * dp > gpus_per_node
    sheet = GPUS[time["gpu"]]  # within a node, its GPUs' link (nanotronix.train.gpus)
    link, gbytes_per_s = ("network", net_gbps / 8) if crosses_nodes else (sheet.node_link, sheet.node_link_gbytes_per_s)
    step_tokens = cfg.train.global_batch_size * cfg.train.seq_len
    compute = step_tokens / (dp * p.tp * p.pp * time["tokens_per_sec_per_gpu"])  # the step's FLOPs / all GPUs
    micro = compute / accum  # one micro-batch's forward and backward on this GPU
    if p.zero_stage == 1:
        seconds = {"reduce_scatter": ring_grads / (gbytes_per_s * 1e9), "all_gather": ring / (gbytes_per_s * 1e9)}
        gather_window = micro / 3 if p.overlap_param_gather else 0.0
        exposed = max(0.0, seconds["reduce_scatter"] - 2 / 3 * micro) + max(0.0, seconds["all_gather"] - gather_window)
    else:
        seconds = {"all_reduce": 2 * ring_grads / (gbytes_per_s * 1e9)}
        exposed = max(0.0, seconds["all_reduce"] - 2 / 3 * micro)
    step = compute + exposed  # with dp 1 the ring volumes are 0: nothing is exposed
    return {"grad_reduce_dtype": p.grad_reduce_dtype,
            "bytes_per_gpu": ring_grads + (ring if p.zero_stage == 1 else ring_grads),
            "link": link, "gbytes_per_s": gbytes_per_s,
            "comm_seconds": sum(seconds.values()), "compute_seconds": compute, "exposed_seconds": exposed,
            "step_seconds": step, "mfu": time["mfu"] * compute / step,
            # the run's time at that pace (time's figures are compute alone)
            "wall_hours": time["wall_hours"] * step / compute, "gpu_hours": time["gpu_hours"] * step / compute}


# ----------------------------------------------------------------------------------------------------- main

def build_plan(config: str, overrides: list[str], gpus: int, mfu: float, gpu: str, net_gbps: float = 400.0,
               gpus_per_node: int = 8) -> dict[str, Any]:
    from nanotronix.config import grad_accum_steps, load_config
    from nanotronix.config_checks import resolve_layout

    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if net_gbps <= 0 or gpus_per_node < 1:
        raise ValueError(f"--net-gbps must be > 0 and --gpus-per-node >= 1, got {net_gbps} and {gpus_per_node}")
    cfg = load_config(config, overrides)
    dp = resolve_layout(cfg, gpus)
    accum = grad_accum_steps(cfg, dp)
    stages = stage_plan(cfg)
    t = cfg.train
    start = resumed_step(cfg)
    memory, time = memory_plan(cfg, dp, accum), time_plan(cfg, gpus, mfu, gpu, stages, start)
    # the activations are eager's count, an upper bound for layers compiled by train.compile (module docstring)
    memory["activations_upper_bound"] = t.compile
    return {
        "config": config, "gpus": gpus,
        "model": {"preset": cfg.model.preset, "parameters": cfg.model.num_parameters()},
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp, "zero_stage": cfg.parallel.zero_stage,
                   "micro_batch_size": t.micro_batch_size, "grad_accum": accum},
        "batch": {"global_batch_size": t.global_batch_size, "seq_len": t.seq_len,
                  "tokens_per_step": t.global_batch_size * t.seq_len},
        "train_steps": t.train_steps, "total_tokens": t.train_steps * t.global_batch_size * t.seq_len,
        "resumed_step": start,
        "stages": stages, "memory": memory, "time": time,
        "comm": comm_plan(cfg, dp, accum, memory["params_per_gpu"], time, net_gbps, gpus_per_node),
        "checkpoints": checkpoint_plan(cfg, start),
    }


def _tok(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def _memory_rank(mem: dict[str, Any], pp: int) -> str:
    """The GPU whose memory the plan reports, in words: at pp 1 there is no pipeline to name a stage of. A middle rank
    is named by its 0-based number with the range it is of ("pipeline rank 2 (ranks 0-3)"): the JSON's "rank 2 of
    4" read as the second of four."""
    if pp == 1:
        return "no pipeline parallelism"
    if mem["stage"] in ("first", "last"):
        return f"{mem['stage']} pipeline stage"
    return f"pipeline rank {mem['pp_rank']} (ranks 0-{pp - 1})"


def _in_flight(held: float) -> str:
    """The micro-batches whose activations that GPU holds at its peak. An interleaved rank's count is the mean of its
    chunks' (each chunk holds whole micro-batches): to 2 decimals, said to be a mean (it read "3.66667")."""
    if held == int(held):
        return f"{int(held)} micro-batch{'' if held == 1 else 'es'} in flight"
    return f"{held:.2f}".rstrip("0") + " micro-batches in flight, the mean over its interleaved chunks"


def format_plan(plan: dict[str, Any]) -> str:
    lay, b, mem, tm = plan["layout"], plan["batch"], plan["memory"], plan["time"]
    lines = [
        f"{plan['config']}: {plan['model']['preset'] or 'custom model'}, {plan['model']['parameters']:,} parameters",
        f"layout: {plan['gpus']} GPUs = tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']} (ZeRO-{lay['zero_stage']}), "
        f"micro-batch {lay['micro_batch_size']}, grad accumulation {lay['grad_accum']}",
        f"batch: {b['global_batch_size']} x {b['seq_len']} = {b['tokens_per_step']:,} tokens/step; "
        f"{plan['train_steps']:,} steps = {plan['total_tokens']:,} tokens ({_tok(plan['total_tokens'])})",
    ]
    if plan["resumed_step"] == plan["train_steps"]:  # the trainer's own words for it; not "steps N+1-N"
        lines.append(f"starts from step {plan['resumed_step']:,} of another run (checkpoint.resume) = "
                     "train.train_steps: the run is complete, nothing left to train")
    elif plan["resumed_step"]:
        lines.append(f"starts from step {plan['resumed_step']:,} of another run (checkpoint.resume): this run trains "
                     f"steps {plan['resumed_step'] + 1:,}-{plan['train_steps']:,}; time and saves count those only")
    lines.append("")
    for s in plan["stages"]:
        if s["steps"] == 0:  # its start_step lies past train.train_steps
            lines.append(f"stage {s['name']}: never reached (it starts at step {s['first_step']:,}, after the last "
                         f"step {plan['train_steps']:,})")
            continue
        lines.append(f"stage {s['name']}: steps {s['first_step']:,}-{s['last_step']:,} ({s['steps']:,} steps), "
                     f"{_tok(s['tokens'])} tokens, starts after {_tok(s['tokens_before'])} tokens, "
                     f"~{tm['stage_wall_hours'][s['name']] / 24:.1f} days")
        for src in s["sources"]:
            epochs = (f"{src['epochs']:.2f} epochs here, {src['epochs_by_stage_end']:.2f} by stage end "
                      f"(store {_tok(src['store_tokens'])} tokens)" if src["epochs"] is not None else src["status"])
            lines.append(f"  {src['share'] * 100:7.3f}%  {_tok(src['tokens']):>9} tokens  {src['path']}: {epochs}")
    missing = sorted({src["path"] for s in plan["stages"] for src in s["sources"] if src["epochs"] is None})
    if missing:
        lines.append(f"({len(missing)} store(s) not readable, so no epochs for them: point data.root=... at the "
                     f"corpus folder)")
    g = mem["gib"]
    lines += [
        "",
        f"memory per GPU (estimate, {_memory_rank(mem, lay['pp'])}, {mem['params_per_gpu'] / 1e6:,.1f}M parameters, "
        f"{_in_flight(mem['in_flight_microbatches'])}): weights {g['weights_fp32']:.2f} GiB fp32 "
        f"+ {g['weights_bf16_copies']:.2f} GiB bf16 copies, grads {g['grads_fp32']:.2f} GiB, optimizer "
        f"{g['optimizer_adamw']:.2f} GiB, activations {g['activations']:.2f} GiB"
        f"{' (as eager keeps them: at most that under train.compile)' if mem['activations_upper_bound'] else ''}"
        f" = {g['total']:.2f} GiB (+ ~1-3 GiB CUDA context, NCCL, fragmentation)",
        f"time at MFU {tm['mfu']:.0%} of {tm['gpu']} ({tm['peak_tflops']} TFLOP/s {tm['dtype']}): "
        f"{tm['flops_per_token'] / 1e9:.2f} GFLOP/token, {tm['total_flops']:.3g} FLOPs, "
        f"{tm['tokens_per_sec_per_gpu']:,.0f} tokens/s/GPU -> {tm['wall_hours']:,.0f} h "
        f"({tm['wall_hours'] / 24:.1f} days) on {plan['gpus']} GPUs = {tm['gpu_hours']:,.0f} GPU-hours",
    ]
    ck = plan["checkpoints"]
    lines.append(f"checkpoints: {ck['bytes_per_checkpoint'] / 1e9:,.1f} GB each (fp32 weights + AdamW moments), "
                 f"{ck['saves']:,} saves; on disk at the end {ck['kept']:,} ({ck['milestones_kept']:,} of them "
                 f"milestones) = {ck['bytes_kept'] / 1e12:,.2f} TB")
    c = plan["comm"]
    if lay["dp"] > 1:
        grad = "bf16" if plan["comm"]["grad_reduce_dtype"] == "bfloat16" else "fp32"
        what = f"{grad} gradient reduce-scatter + weight all-gather" if lay["zero_stage"] == 1 else \
            f"{grad} gradient all-reduce"
        lines.append(
            f"data-parallel traffic per step (estimate): {c['bytes_per_gpu'] / 1e9:.2f} GB per GPU ({what} over "
            f"{lay['dp']} ranks) through {c['link']} at {c['gbytes_per_s']:.0f} GB/s = "
            f"{c['comm_seconds'] * 1e3:,.0f} ms; compute {c['compute_seconds'] * 1e3:,.0f} ms per step"
            + (" hides all of it" if c["exposed_seconds"] == 0 else
               f", ~{c['exposed_seconds'] * 1e3:,.0f} ms not hidden: ~{c['step_seconds'] * 1e3:,.0f} ms per step, "
               f"MFU ~{c['mfu']:.0%} instead of {tm['mfu']:.0%}: ~{c['wall_hours']:,.0f} h "
               f"({c['wall_hours'] / 24:.1f} days) = {c['gpu_hours']:,.0f} GPU-hours ("
               + ("parallel.grad_reduce_dtype=bfloat16 halves the gradients' share; " if grad == "fp32" else "")
               + "more accumulation per GPU, i.e. fewer GPUs for this batch, amortises it; a faster network "
               "shortens it)"))
    return "\n".join(lines)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from nanotronix.errors import UserError

    try:
        plan = build_plan(args.config, args.overrides, args.gpus, args.mfu, args.gpu, args.net_gbps,
                          args.gpus_per_node)
    except (UserError, ValueError, FileNotFoundError) as e:
        return fail(e)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
