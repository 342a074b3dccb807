"""The benchmark's report and baseline, the metrics outputs and the speed switches in cases a mutation review found
untested (~15 s):

- tools/bench_train.py's report: the "vs HF" ratio is the run's tokens/s over the baseline's, MFU divides by the peak
  of the run's own dtype, and the baseline's FLOPs count full causal attention also when the nanotronix runs mask
  documents (main()'s wiring, not only `measure`'s parameter);
- the transformers baseline trains what its docstring says: the loss it returns is transformers' own causal-LM loss
  of the batch (the same input/label shift, fp32 on an fp32 run) and the gradients it clips are those of the mean
  over the micro-batches (accumulation scaled by 1/accum);
- tools/plot_run.py's throughput panel draws tokens/s per GPU (the records also hold the job's total tokens/s);
- the validation loss is the mean over exactly validation.num_samples windows when they split unevenly over the
  data-parallel ranks (the padding rows count for nothing, in the sum nor in the divisor).
"""
from __future__ import annotations

import copy
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import load_tool
from test_metrics_log_properties import call_plot

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_train  # noqa: E402

TINY = ["model.preset=smollm2-135m", "model.num_hidden_layers=2", "model.hidden_size=64",
        "model.intermediate_size=96", "model.num_attention_heads=4", "model.num_key_value_heads=2",
        "model.vocab_size=128", "train.seq_len=16", "train.micro_batch_size=3"]


def test_bench_ratio_mfu_and_the_baselines_flops_in_the_report(tmp_path, monkeypatch):
    """main() with stand-in steps of known pace (the baseline twice as slow as the variant) and a known peak per dtype:
    ratio = run tokens/s / baseline tokens/s (> 1 here), MFU = TFLOP/s over the peak of train.dtype (float32 on a
    CPU run), and with document masking on, the baseline's FLOPs per token are full causal attention's while the
    nanotronix run's count attention inside the documents (nanotronix.train.flops, recomputed here)."""
    from nanotronix.train.flops import document_attention_span, flops_per_token

    def pace(seconds):
        return lambda cfg, device: (lambda batch: time.sleep(seconds) or 1.0)

    monkeypatch.setattr(bench_train, "hf_step_fn", pace(0.06))
    monkeypatch.setattr(bench_train, "nanotronix_step_fn", pace(0.02))
    peaks = {"float32": 40.0, "bfloat16": 160.0}
    monkeypatch.setattr(bench_train, "device_peak_tflops", lambda device, dtype: peaks[dtype])
    out = tmp_path / "bench.json"
    argv = [*TINY, "model.document_mask_eos_id=7", "--documents", "7:4", "--accum", "2", "--warmup", "0",
            "--steps", "2", "--variant", "docs:", "--json", str(out)]
    assert bench_train.main(argv) == 0
    report = json.loads(out.read_text())
    base, run = report["results"]
    assert (base["name"], run["name"]) == ("hf-transformers", "docs")
    assert run["ratio_to_baseline"] == pytest.approx(run["tokens_per_sec_per_gpu"] / base["tokens_per_sec_per_gpu"])
    assert run["ratio_to_baseline"] > 1.5  # the variant is 3x as fast
    for r in (base, run):
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / peaks["float32"])
    args = bench_train.parse_args(argv)
    cfg = bench_train.build_config(args, [], torch.device("cpu"))
    batches = bench_train.make_batches(cfg, 2, 2, args.documents)
    span = sum(document_attention_span(b[..., :-1], 7) for b in batches) / len(batches)
    per_token = {r["name"]: r["tflops_per_gpu"] * 1e12 / r["tokens_per_sec_per_gpu"] for r in (base, run)}
    assert per_token["hf-transformers"] == pytest.approx(flops_per_token(cfg.model, 16))
    assert per_token["docs"] == pytest.approx(flops_per_token(cfg.model, 16, span))


def test_bench_baseline_trains_transformers_own_loss_with_accumulated_mean_gradients(monkeypatch):
    """One step of the baseline (accum 2, fp32 on the CPU): the loss it returns is transformers' own causal-LM loss
    (LlamaForCausalLM(input_ids=window, labels=window), which shifts the labels itself) averaged over the
    micro-batches, and the gradients handed to clipping are those of that mean, computed here on a copy of the
    model taken before the step."""
    args = bench_train.parse_args([*TINY, "--accum", "2"])
    cfg = bench_train.build_config(args, [], torch.device("cpu"))
    assert cfg.train.dtype == "float32"
    (batch,) = bench_train.make_batches(cfg, 1, 2)
    step = bench_train.hf_step_fn(cfg, torch.device("cpu"))
    model = step.model
    reference = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    clipped = {}
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, *a, **k):
        params = list(params)
        clipped.update({names[id(p)]: p.grad.clone() for p in params if p.grad is not None})
        return clip(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    loss = step(batch)

    losses = [reference(input_ids=micro, labels=micro).loss for micro in batch]
    mean = torch.stack(losses).mean()
    mean.backward()
    assert loss == pytest.approx(mean.item(), abs=1e-6)
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert clipped.keys() == want.keys()
    for name, grad in want.items():
        assert torch.allclose(clipped[name], grad, rtol=1e-4, atol=1e-7), name


def test_plot_speed_panel_draws_tokens_per_second_per_gpu(tmp_path, monkeypatch):
    """A record holds the job's tokens_per_sec and tokens_per_sec_per_gpu (run_log.py); the panel labelled
    "tokens/s per GPU" draws the latter, step by step."""
    plot_tool = load_tool("plot_run")
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 4000.0 + s,
             "tokens_per_sec_per_gpu": 1000.0 + s, "mfu": 0.1 + s / 100} for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err, _, drawn = call_plot(plot_tool, monkeypatch, [str(tmp_path)])
    assert code == 0, err
    x, y = drawn["tokens/s per GPU"][0]
    assert x == [r["step"] for r in rows]
    assert y == [r["tokens_per_sec_per_gpu"] for r in rows]
    x, y = drawn["MFU %"][0]
    assert y == pytest.approx([100 * r["mfu"] for r in rows])


@pytest.mark.parametrize("num_samples, dp, micro_batches, micro", [(7, 3, 1, 2), (5, 2, 2, 1), (10, 4, 1, 1)])
def test_validation_loss_is_the_mean_over_exactly_num_samples_windows(num_samples, dp, micro_batches, micro):
    """Validator.run on every data-parallel rank of a simulated dp group (one process: each rank's sum divided by
    num_samples, the sum over ranks being what the all-reduce would give), with a stand-in runner whose "loss" of a
    row is the mean of its labels: the total is the plain mean of that over the first num_samples windows, however
    unevenly they split over the ranks (padding rows count in neither the sum nor the divisor)."""
    from nanotronix.parallel.context import ParallelContext
    from nanotronix.parallel.pipeline import PAD_LABEL
    from nanotronix.train.validation import Validator

    seq_len = 5
    stream = np.random.default_rng(0).integers(0, 50, num_samples * seq_len + 1)
    windows = torch.from_numpy(np.stack([stream[i * seq_len:i * seq_len + seq_len + 1]
                                         for i in range(num_samples)]))

    def evaluate(x, y):
        real = y[:, :, 0] != PAD_LABEL
        return (y.double().mean(-1) * real).sum()

    model = types.SimpleNamespace(grads=types.SimpleNamespace(wait_for_weights=lambda: None),
                                  runner=types.SimpleNamespace(device=torch.device("cpu"), evaluate=evaluate))
    total = 0.0
    for rank in range(dp):
        ctx = ParallelContext(tp=1, pp=1, dp=dp, rank=rank, world_size=dp)
        validator = Validator(model, ctx, {"held": lambda first, count: windows[first:first + count]}, num_samples,
                              micro_batches, micro)
        total += validator.run()["held"]
    want = windows[:, 1:].double().mean(-1).mean().item()
    assert total == pytest.approx(want, rel=1e-12)


def test_a_twin_left_stale_by_a_pending_weight_gather_is_cast_when_the_gather_is_waited():
    """ZeRO-1 with parallel.overlap_param_gather: a bucket whose weight gather is still running when the step starts
    is left stale by `ComputeWeights.arm` and must be cast from the gathered fp32 weights when `weights_ready` waits
    its gather (before the first layer that reads it). One process, the gathers stood in by finished handles: after
    the weights change (an update) and the wait, every decoder linear multiplies with exactly its current weight
    rounded to bf16 (the multi-rank layouts in test_parallel_layouts.py never leave a twin stale: their decoder
    buckets are gathered straight into the twins)."""
    from nanotronix.config import config_from_dict
    from nanotronix.model import build_model
    from nanotronix.model.llama import DecoderLayer
    from nanotronix.parallel import ParallelContext, parallelize
    from nanotronix.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    model_cfg = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 32, "init_std": 0.05,
                 "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    cfg = config_from_dict({"model": model_cfg, "parallel": {"grad_bucket_size": 3000},
                            "train": {"seq_len": 12, "global_batch_size": 6, "micro_batch_size": 2,
                                      "dtype": "bfloat16", "bf16_weight_cache": True}})
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model, "sdpa"), ParallelContext.build(cfg), cfg)
    grads, weights = model.grads, model.grads.compute_weights
    linears = [m for layer in model.modules() if isinstance(layer, DecoderLayer) for m in layer.modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert len(linears) == 2 * 4 and weights.twins
    weights.arm()  # a first step: the twins hold the initial weights
    weights.disarm()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # the update
    for i in weights.twins:
        grads.buckets[i].gather = types.SimpleNamespace(wait=lambda: None)  # gathered, not yet waited
    weights.arm()
    assert weights.stale == set(weights.twins)
    grads.weights_ready(grads.buckets, fp32=False)
    for m in linears:
        assert m.compute_weight is not None
        assert torch.equal(m.compute_weight, m.weight.detach().to(torch.bfloat16)), m
    weights.disarm()


def test_tensorboard_and_wandb_get_the_records_numbers_not_their_flags():
    """`_scalars` (what TensorBoard and W&B are handed): every number of a record under its path, and no true/false
    (a skipped step's "skipped": true is a flag in metrics.jsonl, not a curve of 1s), no null, no text."""
    from nanotronix.train.metrics import _scalars

    record = {"step": 7, "skipped": True, "update_skipped": False, "loss": 2.5, "mfu": None, "stage": "web",
              "val_losses": {"web": 3.0, "flag": True}, "datasets": {"web": {"epochs": 0.5, "last": False}}}
    assert dict(_scalars(record)) == {"step": 7, "loss": 2.5, "val_losses/web": 3.0, "datasets/web/epochs": 0.5}


def test_cpu_profile_counts_each_ops_own_time_once():
    """On CPU ops nest (a record_function range around matmuls, aten ops calling aten ops): `own_times` takes each
    op's self time, so that the rows sum to about the wall time profiled (not more than 1.5x: the profiler's own
    bookkeeping) and the matmuls a good part of it; inclusive times count the nested ops again inside each range
    that holds them (the range, aten::matmul, then aten::mm: a sum of 2.5-3x the wall time)."""
    from torch.profiler import ProfilerActivity, profile

    from nanotronix.train.profiler import own_times, summarize

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        with torch.profiler.record_function("outer"):
            for _ in range(20):
                a = torch.tanh(a @ b)
        wall_ms = 1e3 * (time.perf_counter() - start)
    found = summarize(own_times(prof, cuda=False))
    assert found.total_ms <= 1.5 * wall_ms, (found.total_ms, wall_ms)
    assert found.shares["matmul"] > 0.2, found.shares
