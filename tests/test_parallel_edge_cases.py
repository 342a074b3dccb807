"""Parallel training steps at their edges, each against plain PyTorch or torch's own function (cases a mutation review
of nanotronix/parallel/ and nanotronix/train/step.py found no test for):

- Gradient clipping when the norm is *below* the limit: every layout test clips at 1.0 with gradient norms well
  above it, so a clip that also scales gradients *up* (no `min(1, ...)`) went unnoticed. One process, against
  `torch.nn.utils.clip_grad_norm_` on a plain model's gradients of the same micro-batches, with the limit above
  and below the norm.
- The vocab-parallel cross entropy's shift by the row maximum: with logits spread over more than fp32's exp range
  (~88) between the ranks' slices, shifting by anything but the global maximum (the all-reduce's op, dropped or
  MIN) overflows or underflows; F.cross_entropy of the gathered logits (fp64) is finite. Two gloo ranks under
  torchrun (this file is also the worker).
- The column-parallel matmul's input gradient under bf16 autocast is reduced over TP in fp32 (the input's dtype),
  bit-identical to autocast's cast + collective path. tests/test_parallel_layers.py checks that bit-identity with the
  same weight on every rank, whose partial gradients are then equal and sum exactly in bf16 too, so a reduction in
  bf16 (the cast to the input dtype dropped) passed; here each rank holds its own row block, as in training.
- The deferred gradient buckets (the tied embedding under PP, SP norms) are data-parallel reduced once, in
  `finish()` after their pre-reduction over the embedding/TP group, never launched during backward with the regular
  ones. A launch during backward (the `deferred` check of `_launch_ready` dropped) left the layout tests' numbers
  unchanged on gloo (that early reduction's handle is never waited), yet it is a second DP reduction of the tied
  embedding's bucket, started before its sum over the two stages: here every bucket's reductions are recorded
  (pp2 x dp2, 4 ranks).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 32, "init_std": 0.05,
         "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def _cfg():
    from nanotronix.config import config_from_dict
    return config_from_dict({"model": MODEL, "parallel": {"grad_bucket_size": 2000},
                             "train": {"seq_len": 12, "global_batch_size": 6, "micro_batch_size": 2}})


def _batch():
    return torch.randint(0, MODEL["vocab_size"], (3, 2, 13), generator=torch.Generator().manual_seed(7))


def _clipped_plain_grads(cfg, batch, max_norm):
    """Plain PyTorch: the mean loss over the micro-batches, then torch's clip_grad_norm_."""
    from nanotronix.model import build_model
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for micro in batch:
        logits = model(micro[:, :-1])
        (F.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten()) / len(batch)).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    return norm, {n: p.grad for n, p in model.named_parameters()}


def test_clipping_scales_down_only_as_torch_clip_grad_norm():
    """train_step's gradients after clipping (lr 0: the weights stay, the clipped gradients stay in the buckets)
    equal torch's clip_grad_norm_ of the plain gradients, with the limit 10x above the norm (untouched) and 10x
    below it (scaled down); the returned norm is torch's."""
    from nanotronix.model import build_model
    from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
    from nanotronix.train.optimizer import param_groups
    from nanotronix.train.step import train_step

    cfg, batch = _cfg(), _batch()
    unclipped, _ = _clipped_plain_grads(cfg, batch, float("inf"))
    for max_norm in (10 * unclipped, unclipped / 10):
        torch.manual_seed(0)
        model = parallelize(build_model(cfg.model), ParallelContext.build(cfg), cfg)
        opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.0), lr=0.0, betas=(0.9, 0.95),
                                   eps=1e-8)
        result = train_step(model, opt, batch, lr=0.0, clip_grad=max_norm)
        want_norm, want = _clipped_plain_grads(cfg, batch, max_norm)
        assert result.grad_norm == pytest.approx(want_norm, rel=1e-5)
        params = dict(model.named_parameters())
        for name, grad in want.items():
            torch.testing.assert_close(params[name].main_grad, grad, rtol=1e-5, atol=1e-7,
                                       msg=f"max_norm {max_norm:.3g} (norm {unclipped:.3g}): {name}")


def test_a_non_finite_loss_with_finite_gradients_skips_the_update():
    """train_step leaves the weights (and AdamW's state) alone when the step's loss is not finite, even where the
    gradient norm is finite (the step's docstring: skipped when the loss *or* the norm is not finite). The loss is
    made nan after the real backward, so the gradients stay those of a normal step."""
    from nanotronix.model import build_model
    from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
    from nanotronix.train.optimizer import param_groups
    from nanotronix.train.step import train_step

    cfg, batch = _cfg(), _batch()
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), ParallelContext.build(cfg), cfg)
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.1), lr=1e-2, betas=(0.9, 0.95),
                               eps=1e-8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = model.runner.run
    model.runner.run = lambda *args, **kwargs: run(*args, **kwargs) * float("nan")
    result = train_step(model, opt, batch, lr=1e-2, clip_grad=1.0)
    assert result.grad_norm > 0 and torch.isfinite(torch.tensor(result.grad_norm))
    assert not result.applied
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    assert opt.step_count == 0


# ---- vocab-parallel cross entropy of widely spread logits (torchrun worker below)

def _wide_logits():
    """[tokens, vocab] fp32 logits, labels on both vocabulary halves. Rows of three kinds: the first half ~120 above
    the second, the second ~120 above the first, both halves ~100 above zero. Shifted by the global row maximum
    every row is well inside exp's range; shifted by the smaller half's maximum the first two kinds overflow, by
    the sum of the halves' maxima the third underflows (exp(-100) is an fp32 denormal)."""
    g = torch.Generator().manual_seed(11)
    tokens, vocab = 9, 16
    logits = torch.randn(tokens, vocab, generator=g)
    kind = torch.arange(tokens) % 3
    first = torch.tensor([60.0, -60.0, 100.0])[kind]
    second = torch.tensor([-60.0, 60.0, 100.0])[kind]
    logits[:, : vocab // 2] += first[:, None]
    logits[:, vocab // 2:] += second[:, None]
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    return logits, labels


def _column_matmul_input_grads(world: int, rank: int) -> dict:
    """Max difference of the input gradient (and output) of `column_parallel_matmul` against copy_to_tp /
    gather_from_sequence + F.linear under bf16 autocast, each rank with its own row block of the weight."""
    import torch.distributed as dist
    from nanotronix.parallel import mappings
    from nanotronix.parallel.column_parallel_matmul import column_parallel_matmul
    group = dist.group.WORLD
    torch.manual_seed(2)
    w, x = torch.randn(16 * world, 32), torch.randn(2, 8 * world, 32)
    upstream = torch.randn(2, 8 * world, 16 * world)
    w, upstream = w.chunk(world)[rank], upstream.chunk(world, dim=-1)[rank]
    out = {}
    for gather in (False, True):
        x_in = x.chunk(world, dim=1)[rank] if gather else x
        collective = mappings.gather_from_sequence if gather else mappings.copy_to_tp
        runs = []
        for fused in (False, True):
            xp, wp = x_in.clone().requires_grad_(True), w.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = column_parallel_matmul(xp, wp, group, gather) if fused else F.linear(collective(xp, group), wp)
            (y.float() * upstream).sum().backward()
            runs.append((y.detach().float(), xp.grad))
        (y0, g0), (y1, g1) = runs
        name = "gather_sequence" if gather else "copy"
        out[name] = {"forward": (y1 - y0).abs().max().item(), "grad_input": (g1 - g0).abs().max().item(),
                     "grad_input_dtype": str(g1.dtype), "scale": g0.abs().max().item()}
    return out


def _worker(out: str) -> None:
    """Each rank writes matmul{rank}.json (`_column_matmul_input_grads`) and rank{rank}.json (its per-token loss of
    `_wide_logits`, and the gradient of their sum for its vocabulary half)."""
    import torch.distributed as dist
    from nanotronix.parallel.cross_entropy import vocab_parallel_cross_entropy
    rank, world = dist.get_rank(), dist.get_world_size()
    Path(out, f"matmul{rank}.json").write_text(json.dumps(_column_matmul_input_grads(world, rank)))
    logits, labels = _wide_logits()
    local = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, labels, dist.group.WORLD, reduction="none")
    loss.sum().backward()
    result = {"loss": loss.tolist(), "grad": local.grad.tolist()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()


def _bucket_reductions_worker(out: str) -> None:
    """pp=2 x dp=2 (tied embedding): one train_step, recording every `GradBuffers._reduce` call as (bucket index,
    deferred, whether backward was still running: `in_step`)."""
    import torch.distributed as dist
    from dist_common import make_config, make_data, rank_batch
    from nanotronix.model import build_model
    from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
    from nanotronix.train.optimizer import param_groups
    from nanotronix.train.step import train_step
    cfg = make_config({"pp": 2})
    ctx = ParallelContext.build(cfg)
    torch.manual_seed(cfg.train.seed)
    model = parallelize(build_model(cfg.model, "sdpa"), ctx, cfg)
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.0), lr=1e-3, betas=(0.9, 0.95),
                               eps=1e-8)
    grads, calls = model.grads, []
    reduce = grads._reduce

    def recording_reduce(b, async_op):
        calls.append((b.index, b.deferred, grads.in_step))
        return reduce(b, async_op)
    grads._reduce = recording_reduce
    train_step(model, opt, rank_batch(cfg, make_data(cfg), 1, ctx.dp_rank, ctx.dp), 1e-3, 1.0)
    Path(out, f"buckets{ctx.rank}.json").write_text(json.dumps(
        {"calls": calls, "buckets": [[b.index, b.deferred] for b in grads.buckets], "dp": ctx.dp, "pp": ctx.pp}))
    dist.barrier()


def test_deferred_buckets_are_reduced_once_after_backward(tmp_path):
    """Every gradient bucket of every rank is data-parallel reduced exactly once per step; the deferred ones (the
    tied embedding, summed over the first and last stage first) only in finish(), after backward."""
    from helpers import torchrun
    proc = torchrun(4, [__file__, str(tmp_path), "buckets"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    deferred_seen = 0
    for rank in range(4):
        r = json.loads((tmp_path / f"buckets{rank}.json").read_text())
        assert (r["dp"], r["pp"]) == (2, 2)
        counts = {index: 0 for index, _ in r["buckets"]}
        for index, deferred, in_backward in r["calls"]:
            counts[index] += 1
            if deferred:
                deferred_seen += 1
                assert not in_backward, (rank, index, "a deferred bucket was reduced during backward")
        assert all(n == 1 for n in counts.values()), (rank, counts)
    assert deferred_seen == 4  # the tied embedding's bucket on both ends of both pipelines


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    """One torchrun of 2 gloo ranks running this file's worker; the folder of what each rank wrote."""
    from helpers import torchrun
    out = tmp_path_factory.mktemp("gap_parallel")
    proc = torchrun(2, [__file__, str(out)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def test_vocab_parallel_cross_entropy_of_logits_spread_past_exp_range(worker_out):
    """Per-token loss and d/d logits of 2 ranks' vocabulary halves, 120 apart or both ~100 high, equal
    F.cross_entropy of the whole logits in fp64 (finite: log-sum-exp shifted by the global row maximum)."""
    logits, labels = _wide_logits()
    ref_logits = logits.double().requires_grad_(True)
    ref = F.cross_entropy(ref_logits, labels, reduction="none")
    ref.sum().backward()
    ranks = [json.loads((worker_out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["loss"], dtype=torch.float64), ref.detach(), rtol=1e-5, atol=1e-5)
    grad = torch.cat([torch.tensor(r["grad"], dtype=torch.float64) for r in ranks], dim=-1)
    torch.testing.assert_close(grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_column_parallel_matmul_reduces_bf16_input_gradients_in_fp32(worker_out):
    """Under bf16 autocast, with a different weight block per rank (the ranks' partial input gradients differ), the
    fused column-parallel matmul's input gradient is bit-identical to the collective + F.linear path (which reduces
    the fp32 gradient of autocast's cast), copy and gather_sequence modes, on every rank."""
    for rank in range(2):
        for mode, values in json.loads((worker_out / f"matmul{rank}.json").read_text()).items():
            assert values["scale"] > 1e-3
            assert values["grad_input_dtype"] == "torch.float32"
            assert values["forward"] == 0.0, (rank, mode, values)
            assert values["grad_input"] == 0.0, (rank, mode, values)


if __name__ == "__main__":
    import torch.distributed as dist
    from dist_common import run_worker
    dist.init_process_group("gloo")
    mode = sys.argv[2] if len(sys.argv) > 2 else "layers"
    run_worker(lambda: (_bucket_reductions_worker if mode == "buckets" else _worker)(sys.argv[1]))
