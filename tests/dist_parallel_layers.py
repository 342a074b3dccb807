"""torchrun worker for tests/test_parallel_layers.py: each tensor-parallel layer against its dense equivalent.

    torchrun --nproc_per_node=N tests/dist_parallel_layers.py OUT.json

Every rank builds the same random dense weights and inputs (fixed seeds), runs the dense op in one process and the
TP layer over the whole world, and measures the largest absolute difference of the forward output and of every
gradient against the matching slice of the dense result. Global rank 0 writes {check: {quantity: max error}}
(max over ranks), plus the scale of the dense values so the test can tell a real comparison from zeros.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanotronix.model.loss import InputCollectives  # noqa: E402
from nanotronix.parallel import mappings  # noqa: E402
from nanotronix.parallel.cross_entropy import head_and_loss, vocab_parallel_cross_entropy  # noqa: E402
from nanotronix.parallel.grad_accumulation_fusion import linear_accumulating_weight_grad  # noqa: E402
from nanotronix.parallel.column_parallel_matmul import column_parallel_matmul  # noqa: E402
from dist_common import run_worker  # noqa: E402
from nanotronix.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,  # noqa: E402
                                                 VocabParallelEmbedding)

B, S, D_IN, D_OUT, V = 2, 8, 12, 16, 32


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def chunk(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.chunk(dist.get_world_size(), dim=dim)[dist.get_rank()]


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def check_column(mode: str, g) -> dict:
    torch.manual_seed(0)
    w, x, upstream = torch.randn(D_OUT, D_IN), torch.randn(B, S, D_IN), torch.randn(B, S, D_OUT)
    xd, wd = leaf(x), leaf(w)
    (F.linear(xd, wd) * upstream).sum().backward()
    layer = ColumnParallelLinear.from_dense(w, g, mode)
    xp = leaf(chunk(x, 1) if mode == "gather_sequence" else x)
    y = layer(xp)
    (y * chunk(upstream, 2)).sum().backward()
    want_x = chunk(xd.grad, 1) if mode == "gather_sequence" else xd.grad
    return {"forward": err(y, chunk(F.linear(x, w), 2)), "grad_input": err(xp.grad, want_x),
            "grad_weight": err(layer.weight.grad, chunk(wd.grad, 0)), "shard_dim": layer.weight.tp_shard_dim,
            "scale": xd.grad.abs().max().item()}


def check_column_parallel_matmul(g) -> dict:
    """`column_parallel_matmul` (the column-parallel linears' matmul with its input's collective) against the
    collective + linear it replaces (copy_to_tp or gather_from_sequence, then F.linear; autocast casting after the
    collective): the difference (0 means bit-identical) of the output and of the input and weight gradients, fp32
    and under bf16 autocast (the fp32 weight, or a bf16 copy as train.bf16_weight_cache gives), under sequence
    parallelism with the shard kept or the gathered input kept, and with the weight gradient accumulated into an
    fp32 buffer (train.grad_accumulation_fusion); and the bytes of input each keeps for backward (unique storages
    that autograd saved, the weight left out)."""
    torch.manual_seed(2)
    w, x, upstream = torch.randn(D_OUT, D_IN), torch.randn(B, S, D_IN), torch.randn(B, S, D_OUT)
    # name suffix -> (weight dtype, accumulate into an fp32 buffer)
    variants = {torch.float32: {"": (torch.float32, False), "_acc": (torch.float32, True)},
                torch.bfloat16: {"": (torch.float32, False), "_cache": (torch.bfloat16, False),
                                 "_cache_acc": (torch.bfloat16, True)}}
    results = {}
    for mode, keeps in (("copy", [False]), ("regather", [False]), ("keep", [True])):
        gather = mode != "copy"
        x_in = chunk(x, 1) if gather else x
        collective = mappings.gather_from_sequence if gather else mappings.copy_to_tp
        for dtype, weights in variants.items():
            for suffix, (weight_dtype, accumulate) in weights.items():
                runs = []
                for fused in (False, True):
                    xp, wp = leaf(x_in), leaf(w.to(weight_dtype))
                    main_grad = torch.full_like(w, 0.5) if accumulate else None
                    saved: dict[int, int] = {}

                    def pack(t, saved=saved):
                        if t.shape != w.shape:
                            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                        return t
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                        if fused:
                            y = column_parallel_matmul(xp, wp, g, gather, main_grad, keep_gathered=keeps[0])
                        elif accumulate:
                            y = linear_accumulating_weight_grad(collective(xp, g), wp, main_grad)
                        else:
                            y = F.linear(collective(xp, g), wp)
                    (y.float() * upstream).sum().backward()
                    runs.append((y, xp.grad, main_grad if accumulate else wp.grad, sum(saved.values())))
                (y0, gx0, gw0, kept0), (y1, gx1, gw1, kept1) = runs
                element = 2 if dtype == torch.bfloat16 else 4
                results[f"{mode}_{str(dtype)[6:]}{suffix}"] = {
                    "forward": err(y1, y0), "grad_input": err(gx1, gx0), "grad_weight": err(gw1, gw0),
                    "scale": gx0.abs().max().item(), "kept_input_bytes": float(kept1),
                    "collective_path_kept_bytes": float(kept0), "input_bytes": float(x_in.numel() * element)}
    return results


class _WatchedWork:
    """A collective's work handle that records whether it was waited for."""

    def __init__(self, work):
        self.work, self.waited = work, False

    def wait(self, *args):
        self.waited = True
        return self.work.wait(*args)


@contextlib.contextmanager
def watching_async_collectives(started: list):
    """Every collective `mappings` starts with async_op=True inside the block goes into `started`, wrapped."""
    def watched(collective):
        def call(*args, async_op=False, **kwargs):
            work = collective(*args, async_op=async_op, **kwargs)
            if async_op:
                work = _WatchedWork(work)
                started.append(work)
            return work
        return call
    with mock.patch.object(mappings, "all_gather_flat", watched(mappings.all_gather_flat)), \
            mock.patch.object(mappings, "reduce_scatter_flat", watched(mappings.reduce_scatter_flat)), \
            mock.patch.object(dist, "all_reduce", watched(dist.all_reduce)):
        yield


def check_column_parallel_matmul_waits(g) -> dict:
    """`column_parallel_matmul`'s backward with each of its inputs needing a gradient or not (the input; the weight,
    or its gradient accumulated into an fp32 buffer): the collectives it starts asynchronously, how many of them
    backward returned without waiting for (NCCL may still read or write their tensors then), and the difference of
    the gradients from the collective + linear path (fp32)."""
    torch.manual_seed(4)
    w, x, upstream = torch.randn(D_OUT, D_IN), torch.randn(B, S, D_IN), torch.randn(B, S, D_OUT)
    results = {}
    for mode, keep in (("copy", False), ("regather", False), ("keep", True)):
        gather = mode != "copy"
        x_in = chunk(x, 1) if gather else x
        collective = mappings.gather_from_sequence if gather else mappings.copy_to_tp
        # the input needs a gradient; the weight: "grad" (returned), "frozen" (none), "acc" (accumulated)
        for x_grad, weight in ((True, "grad"), (True, "frozen"), (True, "acc"), (False, "grad"), (False, "acc")):
            runs = []
            for fused in (False, True):
                xp, wp = x_in.clone().requires_grad_(x_grad), w.clone().requires_grad_(weight != "frozen")
                main_grad = torch.full_like(w, 0.5) if weight == "acc" else None
                started: list = []
                if fused:
                    y = column_parallel_matmul(xp, wp, g, gather, main_grad, keep_gathered=keep)
                elif main_grad is not None:
                    y = linear_accumulating_weight_grad(collective(xp, g), wp, main_grad)
                else:
                    y = F.linear(collective(xp, g), wp)
                with watching_async_collectives(started):
                    (y * upstream).sum().backward()
                runs.append((xp.grad, main_grad if main_grad is not None else wp.grad, started))
            (gx0, gw0, _), (gx1, gw1, started) = runs
            values = {"async_started": float(len(started)),
                      "unwaited": float(sum(not work.waited for work in started))}
            if x_grad:
                values["grad_input"] = err(gx1, gx0)
            if weight != "frozen":
                values["grad_weight"] = err(gw1, gw0)
            results[f"{mode}_{'input' if x_grad else 'no_input'}_{weight}"] = values
    return results
def all_gathers_run(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn()'s result and the all-gathers gloo ran meanwhile (by the profiler's events: only a collective that ran,
    not one that torch.compile traced)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "gloo:all_gather")


def check_column_parallel_matmul_compiled(g) -> dict:
    """The same under torch.compile, by Inductor (whose min-cut partitioner chooses what the compiled graph saves, as
    in training) and by aot_eager (the default partitioner): under sequence parallelism and bf16 autocast, with the
    shard kept, with the gathered input kept, and with the shard kept and the weight gradient of a bf16 weight
    accumulated into an fp32 buffer: the difference of output and gradients from the eager function, the bytes of
    input saved for backward (weights in either orientation left out), and the all-gathers that the forward and
    the backward ran, eager and compiled."""
    torch.manual_seed(3)
    s = 12  # B * s tokens: not D_OUT, so that a saved [tokens, D_IN] input is not taken for the weight
    w, x, upstream = torch.randn(D_OUT, D_IN), torch.randn(B, s, D_IN), torch.randn(B, s, D_OUT)
    x_in = chunk(x, 1)
    results = {}
    # name -> (keep_gathered, accumulate into an fp32 buffer)
    cases = {"regather": (False, False), "keep": (True, False), "regather_acc": (False, True)}
    for backend in ("inductor", "aot_eager"):
        for name, (keep_gathered, accumulate) in cases.items():
            def matmul(xp, wp, main_grad, keep_gathered=keep_gathered):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return column_parallel_matmul(xp, wp, g, True, main_grad, keep_gathered=keep_gathered)
            runs = []
            for fn in (matmul, torch.compile(matmul, backend=backend, fullgraph=True)):
                xp, wp = leaf(x_in), leaf(w.to(torch.bfloat16) if accumulate else w)
                main_grad = torch.full_like(w, 0.5) if accumulate else None
                saved: dict[int, int] = {}

                def pack(t, saved=saved):
                    if t.shape not in (w.shape, w.t().shape):
                        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                    return t
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    y, forward_gathers = all_gathers_run(lambda: fn(xp, wp, main_grad))
                _, backward_gathers = all_gathers_run(lambda: (y.float() * upstream).sum().backward())
                runs.append((y, xp.grad, main_grad if accumulate else wp.grad, sum(saved.values()), forward_gathers,
                             backward_gathers))
            (y0, gx0, gw0, _, fw0, bw0), (y1, gx1, gw1, kept, fw1, bw1) = runs
            results[f"{name}_{backend}"] = {
                "forward": err(y1, y0), "grad_input": err(gx1, gx0), "grad_weight": err(gw1, gw0),
                "scale": gx0.abs().max().item(), "kept_input_bytes": float(kept),
                "input_bytes": float(x_in.numel() * 2), "forward_gathers": float(fw1),
                "backward_gathers": float(bw1), "eager_forward_gathers": float(fw0),
                "eager_backward_gathers": float(bw0)}
    return results


def check_row(mode: str, g) -> dict:
    torch.manual_seed(1)
    w, x, upstream = torch.randn(D_OUT, D_IN), torch.randn(B, S, D_IN), torch.randn(B, S, D_OUT)
    xd, wd = leaf(x), leaf(w)
    (F.linear(xd, wd) * upstream).sum().backward()
    layer = RowParallelLinear.from_dense(w, g, mode)
    xp = leaf(chunk(x, 2))
    y = layer(xp)
    seq = mode == "reduce_scatter_sequence"
    (y * (chunk(upstream, 1) if seq else upstream)).sum().backward()
    want_y = F.linear(x, w)
    return {"forward": err(y, chunk(want_y, 1) if seq else want_y), "grad_input": err(xp.grad, chunk(xd.grad, 2)),
            "grad_weight": err(layer.weight.grad, chunk(wd.grad, 1)), "shard_dim": layer.weight.tp_shard_dim,
            "scale": xd.grad.abs().max().item()}


def check_embedding(sequence_parallel: bool, g) -> dict:
    torch.manual_seed(2)
    w, ids, upstream = torch.randn(V, D_OUT), torch.randint(0, V, (B, S)), torch.randn(B, S, D_OUT)
    wd = leaf(w)
    (F.embedding(ids, wd) * upstream).sum().backward()
    layer = VocabParallelEmbedding.from_dense(w, g, sequence_parallel)
    y = layer(ids)
    (y * (chunk(upstream, 1) if sequence_parallel else upstream)).sum().backward()
    want_y = F.embedding(ids, w)
    return {"forward": err(y, chunk(want_y, 1) if sequence_parallel else want_y),
            "grad_weight": err(layer.weight.grad, chunk(wd.grad, 0)), "shard_dim": layer.weight.tp_shard_dim,
            "scale": wd.grad.abs().max().item()}


def check_cross_entropy(g, logit_scale: float) -> dict:
    torch.manual_seed(3)
    logits = torch.randn(B, S, V) * logit_scale
    labels = torch.randint(0, V, (B, S))
    labels[0, :3] = -100  # ignored tokens
    ld = leaf(logits)
    want = F.cross_entropy(ld.flatten(0, 1), labels.flatten(), ignore_index=-100)
    want.backward()
    lp = leaf(chunk(logits, 2))
    got = vocab_parallel_cross_entropy(lp, labels, g)
    got.backward()
    per_token = vocab_parallel_cross_entropy(chunk(logits, 2), labels, g, reduction="none")
    want_tok = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return {"forward": err(got, want), "forward_per_token": err(per_token.flatten(), want_tok),
            "grad_logits": err(lp.grad, chunk(ld.grad, 2)), "scale": ld.grad.abs().max().item()}


def check_cross_entropy_nothing_counted(g) -> dict:
    """The mean over labels all at the ignore index: F.cross_entropy's nan, with zero gradients (a nan gradient is
    an infinite error: one such micro-batch would make every weight nan)."""
    torch.manual_seed(3)
    logits, labels = torch.randn(B, S, V), torch.full((B, S), -100)
    ld = leaf(logits)
    want = F.cross_entropy(ld.flatten(0, 1), labels.flatten(), ignore_index=-100)
    want.backward()
    lp = leaf(chunk(logits, 2))
    got = vocab_parallel_cross_entropy(lp, labels, g)
    got.backward()
    return {"loss_is_nan": float(got.isnan()), "reference_loss_is_nan": float(want.isnan()),
            "grad_logits": (lp.grad - chunk(ld.grad, 2)).abs().max().nan_to_num(nan=float("inf")).item(),
            "reference_grad": ld.grad.abs().max().item()}


def check_fused_head_loss(mode: str, g, logit_scale: float, compile_options=None) -> dict:
    """train.loss_chunk_size under TP: the head fused into the loss over each rank's vocabulary slice, in chunks of
    5 tokens (16 tokens: the last chunk is short; a quarter of the labels at the ignore index -100), against
    F.cross_entropy of the dense head's full logits."""
    torch.manual_seed(5)
    w, h, labels = torch.randn(V, D_IN) * logit_scale, torch.randn(B, S, D_IN), torch.randint(0, V, (B, S))
    labels[torch.rand(B, S) < 0.25] = -100
    hd, wd = leaf(h), leaf(w)
    want = F.cross_entropy(F.linear(hd, wd).flatten(0, 1), labels.flatten())
    want.backward()
    head = ColumnParallelLinear.from_dense(w, g, mode)
    hp = leaf(chunk(h, 1) if mode == "gather_sequence" else h)
    got = head_and_loss(hp, head, labels, 5, torch.float32, compile_options, g)
    got.backward()
    want_h = chunk(hd.grad, 1) if mode == "gather_sequence" else hd.grad
    # relative: with logits of ~100 the loss is ~100, where fp32 rounds to ~1e-5
    return {"forward": err(got, want) / max(1.0, abs(want.item())), "grad_input": err(hp.grad, want_h),
            "grad_weight": err(head.weight.grad, chunk(wd.grad, 0)), "shard_dim": head.weight.tp_shard_dim,
            "scale": max(wd.grad.abs().max().item(), hd.grad.abs().max().item())}


def check_fused_head_loss_bf16(mode: str, g) -> dict:
    """train.loss_chunk_size under TP with bf16 matmuls on the fp32 norm output: the head's input collectives inside
    the fused loss (the gather in bf16, the bf16 dX kept, scaled and summed over the ranks in fp32) against the
    plain collective (copy_to_tp / gather_from_sequence of the fp32 output) before the same fused loss. Bit for
    bit, with an incoming gradient (1/3) that is not a power of two, so a scale or sum in bf16 would show."""
    torch.manual_seed(6)
    w, h, labels = torch.randn(V, D_IN), torch.randn(B, S, D_IN), torch.randint(0, V, (B, S))
    labels[torch.rand(B, S) < 0.25] = -100
    sharded = mode == "gather_sequence"
    grads = []
    for plain in (False, True):
        head = ColumnParallelLinear.from_dense(w, g, mode)
        hp = leaf(chunk(h, 1) if sharded else h)
        hidden = hp
        if plain:  # the collective outside, in fp32, and none inside the loss
            hidden = mappings.gather_from_sequence(hp, g) if sharded else mappings.copy_to_tp(hp, g)
            head.input_collectives = lambda: InputCollectives(None, lambda grad: grad)
        loss = head_and_loss(hidden, head, labels, 5, torch.bfloat16, None, g)
        (loss / 3).backward()
        grads.append((loss, hp.grad, head.weight.grad))
    (got, got_h, got_w), (want, want_h, want_w) = grads
    return {"forward": err(got, want), "grad_input": err(got_h, want_h), "grad_weight": err(got_w, want_w),
            "scale": want_h.abs().max().item()}


def check_mappings(g) -> dict:
    """gather/scatter over the sequence are inverses, and their backward passes are the adjoint collectives."""
    torch.manual_seed(4)
    x = torch.randn(B, S, D_IN)
    local = leaf(chunk(x, 1))
    full = mappings.gather_from_sequence(local, g)
    (full * torch.arange(S).view(1, S, 1)).sum().backward()
    scattered = mappings.scatter_to_sequence(x, g)
    # d/d local of sum(gathered * position) summed over ranks: each rank adds the same upstream -> world * position
    want_grad = chunk(torch.arange(S).view(1, S, 1).expand(B, S, D_IN).float(), 1) * dist.get_world_size()
    return {"forward": err(full, x), "scatter": err(scattered, chunk(x, 1)), "grad_input": err(local.grad, want_grad),
            "scale": 1.0}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    g = dist.group.WORLD

    def check_all() -> None:
        checks = {
            "column_copy": check_column("copy", g),
            "column_gather_sequence": check_column("gather_sequence", g),
            "row_reduce": check_row("reduce", g),
            "row_reduce_scatter_sequence": check_row("reduce_scatter_sequence", g),
            "embedding": check_embedding(False, g),
            "embedding_sequence_parallel": check_embedding(True, g),
            "cross_entropy": check_cross_entropy(g, 1.0),
            "cross_entropy_large_logits": check_cross_entropy(g, 80.0),
            "cross_entropy_nothing_counted": check_cross_entropy_nothing_counted(g),
            "mappings_sequence": check_mappings(g),
            "fused_head_loss_copy": check_fused_head_loss("copy", g, 1.0),
            "fused_head_loss_gather_sequence": check_fused_head_loss("gather_sequence", g, 1.0),
            "fused_head_loss_large_logits": check_fused_head_loss("copy", g, 30.0),
            "fused_head_loss_compiled": check_fused_head_loss("gather_sequence", g, 1.0, {"backend": "aot_eager"}),
            "fused_head_loss_bf16_copy": check_fused_head_loss_bf16("copy", g),
            "fused_head_loss_bf16_gather_sequence": check_fused_head_loss_bf16("gather_sequence", g),
        }
        paths = check_column_parallel_matmul(g)
        compiled = check_column_parallel_matmul_compiled(g)
        waits = check_column_parallel_matmul_waits(g)
        for values in [*checks.values(), *paths.values(), *compiled.values(), *waits.values()]:  # worst case over ranks
            for key, value in values.items():
                if isinstance(value, float):
                    t = torch.tensor(value, dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    values[key] = t.item()
        if dist.get_rank() == 0:
            out.write_text(json.dumps({"world_size": dist.get_world_size(), "checks": checks,
                                       "column_parallel_matmul": paths,
                                       "column_parallel_matmul_compiled": compiled,
                                       "column_parallel_matmul_waits": waits}))
    run_worker(check_all)


if __name__ == "__main__":
    main()
