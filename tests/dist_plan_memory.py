"""torchrun worker for tests/test_plan_memory_parallel.py: what each rank of a pipeline / data-parallel layout keeps.

    torchrun --nproc_per_node=4 tests/dist_plan_memory.py --out DIR LAYOUT [LAYOUT ...]

A LAYOUT is `name:key=value,...` as in dist_parallel_layouts.py (ParallelConfig fields, `train.NAME` fields); the
model is tests/test_plan_memory.py's with 8 layers. Each layout trains one step (the schedule sets itself up: its
receive buffers are made once and kept), then runs the next step's micro-batches under `LiveStorages` and writes
DIR/NAME/rank{R}.json with:
  peak_activations: the most bytes alive at once outside the backward passes (`count_in_flight`) of the storages
      the step made (weights and their bf16 copies apart): what the micro-batches in flight keep, and the loss;
  left_after_step: bytes of the storages the step made that are still alive after it (activations and copies);
  left_by_update: bytes of the storages the optimizer's update then made that are alive while its ZeRO-1 weight
      gathers run;
  kept_buffers: bytes the pipeline stages hold between steps (`stage_buffer_bytes`);
  peak_in_flight: the most forwards whose backward had not run yet, in micro-batches of the rank's layers (a chunk
      of the interleaved schedule counts its share of the rank's layers);
  peak_weight_copies: the most bytes of autocast's bf16 weight copies alive after a forward;
  layers, params; and the data-parallel state: the gradient buffers' bytes (the buckets and the reduced shards
  the optimizer reads, each storage once), AdamW's moments' bytes, the fp32 weights' bytes.
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_common import run_layouts_main  # noqa: E402
from live_storages import LiveStorages  # noqa: E402
from nanotronix.config import config_from_dict  # noqa: E402
from nanotronix.model import build_model  # noqa: E402
from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize  # noqa: E402
from nanotronix.train.optimizer import param_groups  # noqa: E402
from nanotronix.train.step import train_step  # noqa: E402
from test_plan_memory import MODEL, SEQ  # noqa: E402

LAYERS = 8  # pp 4 x 2 virtual stages: a layer per chunk


def layout_config(fields: dict):
    train = {k.split(".", 1)[1]: fields.pop(k) for k in list(fields) if k.startswith("train.")}
    return config_from_dict({"model": {**MODEL, "num_hidden_layers": LAYERS}, "parallel": fields,
                             "train": {"seq_len": SEQ, "micro_batch_size": 1, "dtype": "bfloat16", **train}})


def unique_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def stage_buffer_bytes(model) -> int:
    """Bytes the pipeline stages keep between steps: a receive buffer per micro-batch for the activations and one
    for their gradients, and the gradients of the received activations (`.grad` of the buffers)."""
    if model.runner._stages is None:
        return 0
    tensors = []
    for stage in model.runner._stages:
        for infos in list(stage.args_recv_info.values()) + list(stage.grad_recv_info.values()):
            for info in infos:  # the first stage's inputs: placeholders with no buffer under torch 2.11
                buffer = getattr(info, "buffer", None)
                if buffer is not None:
                    tensors += [buffer, buffer.grad]
    return unique_bytes(tensors)


def count_in_flight(model, storages: LiveStorages) -> dict:
    """Wrap the pipeline stages' forward and backward of one chunk to follow the forwards awaiting their backward,
    in layers (returns the record the wrappers update), and to leave the backward passes out of the peak of the
    mark "step": what they make passes (gradients on their way), the plan counts what the stages hold."""
    record = {"now": 0, "peak": 0, "copies": 0}
    for stage, chunk in zip(model.runner._stages, model.chunks):
        def forward(*args, _run=stage.forward_one_chunk, _layers=len(chunk.layers), **kwargs):
            out = _run(*args, **kwargs)
            record["now"] += _layers
            record["peak"] = max(record["peak"], record["now"])
            record["copies"] = max(record["copies"], storages.alive(since=storages.marks["step"])[1])
            return out

        def backward(*args, _run=stage.backward_one_chunk, _layers=len(chunk.layers), **kwargs):
            peak = storages.peaks["step"]
            _run(*args, **kwargs)
            storages.peaks["step"] = peak
            record["now"] -= _layers
        stage.forward_one_chunk, stage.backward_one_chunk = forward, backward
    return record


def run_layout(name: str, fields: dict, out: Path) -> None:
    cfg = layout_config(fields)
    ctx = ParallelContext.build(cfg)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), ctx, cfg)
    optimizer = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.1), lr=1e-3,
                                     betas=(0.9, 0.95), eps=1e-8)
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * ctx.dp)
    g = torch.Generator().manual_seed(ctx.dp_rank)
    batches = torch.randint(0, MODEL["vocab_size"], (2, accum, 1, SEQ + 1), generator=g)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    train_step(model, optimizer, batches[0], 1e-3, 1.0)
    gc.collect()
    storages = LiveStorages(params)
    in_flight = count_in_flight(model, storages) if ctx.pp > 1 else None
    batch = batches[1]
    model.grads.start(accum)
    with storages:
        storages.mark("step")
        model.runner.run(batch[..., :-1], batch[..., 1:], scale=1.0 / (accum * ctx.dp))
    model.grads.finish()
    # gloo's worker thread drops its reference to a finished collective's tensors just after wait() returns (the
    # TP collectives' shards were seen alive once, 196,608 bytes on one rank): looked at again for up to a second
    for _ in range(20):
        gc.collect()
        left = storages.alive(since=storages.marks["step"])
        if left[0] + left[1] == 0:
            break
        time.sleep(0.05)
    with storages:  # the update, with ZeRO-1 its weight gathers started (parallel.overlap_param_gather)
        storages.mark("update")
        optimizer.step(1e-3)
    gc.collect()
    left_by_update = storages.alive(since=storages.marks["update"])[0]
    model.grads.wait_for_weights()
    layers = sum(len(chunk.layers) for chunk in model.chunks)
    state = [t for s in optimizer.inner.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    record = {
        "coords": {"pp": ctx.pp_rank, "dp": ctx.dp_rank}, "accum": accum, "layers": layers,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_activations": storages.peaks["step"],
        "left_after_step": left[0] + left[1],
        "left_by_update": left_by_update,
        "kept_buffers": stage_buffer_bytes(model),
        "peak_in_flight": in_flight["peak"] / layers if in_flight else 1,
        "peak_weight_copies": in_flight["copies"] if in_flight else None,
        "grad_bytes": unique_bytes([t for b in model.grads.buckets for t in (b.grad, b.shard_grad)]),
        "optimizer_bytes": unique_bytes(state),
        "weight_bytes": unique_bytes([b.data for b in model.grads.buckets]),
    }
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{ctx.rank}.json").write_text(json.dumps(record))
    dist.barrier()


if __name__ == "__main__":
    run_layouts_main(__doc__.splitlines()[0], run_layout)
