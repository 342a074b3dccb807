"""torchrun worker for tests/test_parallel_properties.py: every generated case against its dense fp64 reference.

    torchrun --nproc_per_node=TP tests/dist_parallel_properties.py CASES.json OUT.json

CASES.json is a list of cases (plain JSON, drawn by hypothesis in the test; one case alone replays it). Every rank
builds the same tensors from the case's seed, runs the tensor-parallel code over the whole world and the dense op
in fp64 on the rounded inputs (F.linear, F.embedding, F.cross_entropy), and measures, for each quantity, the
largest absolute difference from the matching slice of the dense result. Global rank 0 writes, per case,
{quantity: [error, scale, floor, tolerance]} (error and scales the worst over ranks; nan in one of got and want but
not both is an infinite error): the test holds error <= rel * scale + floor_rel * floor, with (rel, floor_rel) the
named tolerance's. `scale` is what rounding is relative to (the reference's largest entry, or the loss's size),
`floor` the size of the terms a result sums (where those cancel, rounding is on their scale, not the result's).
A case that raises stops the run, naming the case.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_parallel_layers import chunk, leaf  # also puts the repository root on sys.path
from dist_common import run_worker

from nanotronix.distributed import shutdown_and_exit
from nanotronix.parallel import mappings
from nanotronix.parallel.cross_entropy import head_and_loss, vocab_parallel_cross_entropy
from nanotronix.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

IGNORE = -100


def compare(got: torch.Tensor, want: torch.Tensor, tolerance: str, scale: float | None = None,
            floor: float = 0.0) -> list:
    """[max |got - want|, scale (default max |want|), floor, tolerance]; nan where both are nan is no error."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    both_nan = got.isnan() & want.isnan()
    diff = (got - want).abs().masked_fill(both_nan, 0.0).nan_to_num(nan=math.inf)
    error = diff.max().item() if diff.numel() else 0.0
    if scale is None:
        scale = want.nan_to_num(nan=0.0).abs().max().item() if want.numel() else 0.0
    return [error, scale, floor, tolerance]


def amax(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def own(parts: torch.Tensor) -> torch.Tensor:
    """This rank's row of [world, ...] (per-rank inputs, drawn alike on every rank)."""
    return parts[dist.get_rank()]


def make_labels(g: torch.Generator, n: int, case: dict, ignored: str | None = None) -> torch.Tensor:
    """n labels in [0, vocab): with `boundary`, half of them at either side of a rank's slice edge (where an
    off-by-one shows); `ignored` (the case's unless given) none / some / all_but_one / all of them set to the
    ignore index."""
    vocab, tp, ignored = case["vocab"], dist.get_world_size(), ignored or case["ignored"]
    labels = torch.randint(0, vocab, (n,), generator=g)
    if case["boundary"]:
        step = vocab // tp
        edges = torch.tensor(sorted({e for k in range(tp + 1) for e in (k * step - 1, k * step) if 0 <= e < vocab}))
        at_edge = torch.rand(n, generator=g) < 0.5
        labels = torch.where(at_edge, edges[torch.randint(0, len(edges), (n,), generator=g)], labels)
    masks = {"none": torch.zeros(n, dtype=torch.bool), "all": torch.ones(n, dtype=torch.bool),
             "some": torch.rand(n, generator=g) < 0.3, "all_but_one": torch.ones(n, dtype=torch.bool)}
    mask = masks[ignored]
    if ignored in ("some", "all_but_one"):
        mask[torch.randint(0, n, (), generator=g)] = False
    return labels.masked_fill(mask, IGNORE)


def batch_shape(case: dict) -> tuple[int, ...]:
    return (case["rows"], case["tokens"]) if case["rows"] > 1 else (case["tokens"],)


def check_cross_entropy(case: dict, group) -> dict:
    """vocab_parallel_cross_entropy of the rank's vocabulary slice of logits (fp32 or bf16, spread
    `logit_scale`) against F.cross_entropy of the whole logits: the loss (every reduction) and d/d logits under an
    incoming gradient (a random one per token for "none"). The loss is computed in fp32 whatever the logits' dtype,
    so it is held to fp32 on the scale of the logits (log-sum-exp and the label's logit are both that large)."""
    g = torch.Generator().manual_seed(case["seed"])
    shape, vocab, reduction = batch_shape(case), case["vocab"], case["reduction"]
    n = math.prod(shape)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["precision"]]
    logits = (torch.randn(n, vocab, generator=g) * case["logit_scale"]).to(dtype).view(*shape, vocab)
    labels = make_labels(g, n, case).view(shape)
    upstream = (torch.randn(shape, generator=g, dtype=torch.float64) if reduction == "none"
                else torch.tensor(case["grad_loss"], dtype=torch.float64))
    dense = leaf(logits.double())
    want = F.cross_entropy(dense.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction=reduction)
    want.backward(upstream.flatten() if reduction == "none" else upstream)
    local = leaf(chunk(logits, -1))
    got = vocab_parallel_cross_entropy(local, labels, group, ignore_index=IGNORE, reduction=reduction)
    got.backward(upstream.float())
    counted = int((labels != IGNORE).sum())
    loss_scale = (1 + amax(logits)) * (max(counted, 1) if reduction == "sum" else 1)
    # each token's incoming gradient: the largest drawn one, grad_loss, or grad_loss / counted for the mean
    per_token = {"none": amax(upstream), "sum": case["grad_loss"],
                 "mean": case["grad_loss"] / max(counted, 1)}[reduction]
    grad_tolerance = "fp32" if dtype == torch.float32 else "bf16_logits_grad"
    return {"loss": compare(got.flatten(), want.flatten(), "fp32", scale=loss_scale),
            # d/d logits = (softmax - onehot) * the token's incoming gradient: entries at most that gradient
            "grad_logits": compare(local.grad, chunk(dense.grad, -1), grad_tolerance, scale=per_token,
                                   floor=per_token),
            "grad_in_logits_dtype": [float(local.grad.dtype != dtype), 0.0, 0.0, "exact"]}


def check_head_and_loss(case: dict, group) -> dict:
    """head_and_loss (the head fused into the vocab-parallel loss, in chunks of `chunk` tokens) against
    F.cross_entropy of the dense head's full logits: the mean loss, d/d hidden and d/d head weight under an
    incoming gradient. Tolerances as test_numerics_properties' for linear_cross_entropy: the loss within 1e-5 of
    (1 + loss) in fp32 and 4 bf16 roundings of (1 + the largest logit spread max |w_v|) in bf16; each gradient
    within rel of its largest entry plus floor_rel of grad_loss / counted * max |the other factor|. That bf16
    floor holds up to spreads of 10 (the numerics tests' range); past it the floor grows with spread / 10: bf16
    moves each logit by a fraction of its size, so softmax (the gradients) by a fraction of the spread (a spread
    of 35 moved d/d hidden by 10% of grad_loss / counted * max |w|, in the plain single-process loss as here)."""
    g = torch.Generator().manual_seed(case["seed"])
    b, s, dim, vocab, mode = case["rows"], case["tokens"], case["hidden"], case["vocab"], case["mode"]
    hidden = torch.randn(b, s, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * case["logit_scale"] / math.sqrt(dim)
    labels = make_labels(g, b * s, case).view(b, s)
    grad_loss = torch.tensor(case["grad_loss"], dtype=torch.float64)
    hd, wd = leaf(hidden.double()), leaf(weight.double())
    want = F.cross_entropy(F.linear(hd, wd).flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    want.backward(grad_loss)
    head = ColumnParallelLinear.from_dense(weight, group, mode)
    hp = leaf(chunk(hidden, 1) if mode == "gather_sequence" else hidden)
    precision = case["precision"]
    compute_dtype = torch.bfloat16 if precision == "bf16" else None  # the trainer's bf16 (ModelChunk.compute_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
        got = head_and_loss(hp, head, labels, case["chunk"], compute_dtype, None, group)
    got.backward(grad_loss.float())
    counted = max(int((labels != IGNORE).sum()), 1)
    want_h = chunk(hd.grad, 1) if mode == "gather_sequence" else hd.grad
    fp32 = precision == "fp32"
    no_loss = math.isnan(want.item())  # no label counted: nan, F.cross_entropy's mean of nothing
    spread = weight.double().norm(dim=1).max().item()  # hidden ~ N(0, 1): the largest logit standard deviation
    loss_scale = 1 + (0.0 if no_loss else abs(want.item()) if fp32 else spread)
    tolerance = "fp32" if fp32 else "bf16"
    per_token = case["grad_loss"] / counted * (1.0 if fp32 else max(1.0, spread / 10))
    return {"loss": (compare(got, want, "fp32", scale=loss_scale) if fp32
                     else compare(got, want, "bf16_loss", scale=0.0, floor=loss_scale)),
            "grad_hidden": compare(hp.grad, want_h, tolerance, floor=per_token * amax(weight)),
            "grad_weight": compare(head.weight.grad, chunk(wd.grad, 0), tolerance, floor=per_token * amax(hidden))}


def linear_inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [rows, tokens, d_in] of size `input_scale`, weight [d_out, d_in] ~ 1/sqrt(d_in), the incoming gradient
    (bf16-representable under bf16, so both paths start from the same one)."""
    g = torch.Generator().manual_seed(case["seed"])
    b, s, d_in, d_out = case["rows"], case["tokens"], case["d_in"], case["d_out"]
    x = torch.randn(b, s, d_in, generator=g) * case["input_scale"]
    w = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    upstream = torch.randn(b, s, d_out, generator=g)
    if case["precision"] == "bf16_autocast":
        upstream = upstream.bfloat16().float()
    return x, w, upstream


def dense_linear(x, w, upstream):
    """F.linear in fp64 and its gradients, and the size of the terms each sums (|x| |W|^T and the like)."""
    xd, wd = leaf(x.double()), leaf(w.double())
    y = F.linear(xd, wd)
    y.backward(upstream.double())
    ax, aw, au = x.double().abs(), w.double().abs(), upstream.double().abs()
    terms = {"out": F.linear(ax, aw), "grad_input": au @ aw, "grad_weight": au.flatten(0, 1).t() @ ax.flatten(0, 1)}
    return y.detach(), xd.grad, wd.grad, terms


def check_column(case: dict, group) -> dict:
    """ColumnParallelLinear (input copy or gather_sequence) against F.linear: the output's split along the
    features, d/d input, d/d the weight's row block; fp32 or under bf16 autocast."""
    x, w, upstream = linear_inputs(case)
    y, gx, gw, terms = dense_linear(x, w, upstream)
    mode = case["mode"]
    layer = ColumnParallelLinear.from_dense(w, group, mode)
    xp = leaf(chunk(x, 1) if mode == "gather_sequence" else x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["precision"] == "bf16_autocast"):
        out = layer(xp)
    out.backward(chunk(upstream, 2).to(out.dtype))
    grad_input, want_gx, gx_terms = xp.grad, gx, terms["grad_input"]
    if mode == "gather_sequence":
        want_gx, gx_terms = chunk(gx, 1), chunk(gx_terms, 1)
    tolerance = "fp32" if case["precision"] == "fp32" else "bf16"
    return {"out": compare(out, chunk(y, 2), tolerance, floor=amax(chunk(terms["out"], 2))),
            "grad_input": compare(grad_input, want_gx, tolerance, floor=amax(gx_terms)),
            "grad_weight": compare(layer.weight.grad, chunk(gw, 0), tolerance,
                                   floor=amax(chunk(terms["grad_weight"], 0)))}


def check_row(case: dict, group) -> dict:
    """RowParallelLinear (output all-reduced, or reduce-scattered over the sequence) against F.linear: the output
    (whole, or this rank's sequence chunk), d/d the input's feature chunk, d/d the weight's column block."""
    x, w, upstream = linear_inputs(case)
    y, gx, gw, terms = dense_linear(x, w, upstream)
    seq = case["mode"] == "reduce_scatter_sequence"
    layer = RowParallelLinear.from_dense(w, group, case["mode"])
    xp = leaf(chunk(x, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["precision"] == "bf16_autocast"):
        out = layer(xp)
    out.backward((chunk(upstream, 1) if seq else upstream).to(out.dtype))
    want_y, y_terms = (chunk(y, 1), chunk(terms["out"], 1)) if seq else (y, terms["out"])
    tolerance = "fp32" if case["precision"] == "fp32" else "bf16"
    return {"out": compare(out, want_y, tolerance, floor=amax(y_terms)),
            "grad_input": compare(xp.grad, chunk(gx, 2), tolerance, floor=amax(chunk(terms["grad_input"], 2))),
            "grad_weight": compare(layer.weight.grad, chunk(gw, 1), tolerance,
                                   floor=amax(chunk(terms["grad_weight"], 1)))}


def check_embedding(case: dict, group) -> dict:
    """VocabParallelEmbedding (output all-reduced, or reduce-scattered over the sequence) against F.embedding: the
    output exactly (one rank's row plus zeros), d/d the weight's row block (sums of incoming gradient rows)."""
    g = torch.Generator().manual_seed(case["seed"])
    b, s, vocab, dim, sp = case["rows"], case["tokens"], case["vocab"], case["hidden"], case["sequence_parallel"]
    weight = torch.randn(vocab, dim, generator=g)
    ids = make_labels(g, b * s, case, ignored="none").view(b, s)
    upstream = torch.randn(b, s, dim, generator=g)
    wd = leaf(weight.double())
    want = F.embedding(ids, wd)
    want.backward(upstream.double())
    terms = leaf(torch.zeros(vocab, dim, dtype=torch.float64))
    F.embedding(ids, terms).backward(upstream.double().abs())  # the sum of |incoming rows| per vocabulary row
    layer = VocabParallelEmbedding.from_dense(weight, group, sp)
    out = layer(ids)
    out.backward(chunk(upstream, 1) if sp else upstream)
    want_out = chunk(want, 1) if sp else want
    return {"out": compare(out, want_out, "exact"),
            "grad_weight": compare(layer.weight.grad, chunk(wd.grad, 0), "fp32",
                                   floor=amax(chunk(terms.grad, 0)))}


def check_sequence(case: dict, group) -> dict:
    """The differentiable collectives of `mappings` against their definitions on per-rank inputs: gather and
    scatter over the sequence undo each other; each backward is the adjoint collective (gather <-> reduce-scatter,
    scatter -> gather, copy -> all-reduce, reduce -> identity); a sequence the tensor-parallel size does not divide
    is refused with a ValueError."""
    g = torch.Generator().manual_seed(case["seed"])
    tp = dist.get_world_size()
    b, s, dim = case["rows"], case["tokens"], case["hidden"]
    full = torch.randn(b, s, dim, generator=g)  # the same on every rank
    per_rank = torch.randn(tp, b, s, dim, generator=g)  # rank r's partial sums / incoming gradients
    per_rank_chunks = torch.randn(tp, b, s // tp, dim, generator=g)
    summed, summed_terms = per_rank.double().sum(0), per_rank.double().abs().sum(0)
    whole_of_chunks = torch.cat(list(per_rank_chunks), dim=1)

    local = leaf(chunk(full, 1))
    gathered = mappings.gather_from_sequence(local, group)
    gathered.backward(own(per_rank))
    scattered_x = leaf(full)
    scattered = mappings.scatter_to_sequence(scattered_x, group)
    scattered.backward(own(per_rank_chunks))
    partial = leaf(own(per_rank))
    reduced_scattered = mappings.reduce_scatter_to_sequence(partial, group)
    reduced_scattered.backward(own(per_rank_chunks))
    copied_x = leaf(full)
    copied = mappings.copy_to_tp(copied_x, group)
    copied.backward(own(per_rank))
    reduced_x = leaf(own(per_rank))
    reduced = mappings.reduce_from_tp(reduced_x, group)
    reduced.backward(full)
    indivisible = torch.zeros(b, s + 1, dim)  # s is a multiple of tp >= 2, so s + 1 is not
    refused = 0
    for op in (mappings.scatter_to_sequence, mappings.reduce_scatter_to_sequence):
        try:
            op(indivisible, group)
        except ValueError as e:  # one line that says why
            refused += "not divisible" in str(e) and "\n" not in str(e)
    sum_floor = amax(summed_terms)
    return {
        "gather": compare(gathered, full, "exact"),
        "gather_backward": compare(local.grad, chunk(summed, 1), "fp32", floor=amax(chunk(summed_terms, 1))),
        "scatter": compare(scattered, chunk(full, 1), "exact"),
        "scatter_backward": compare(scattered_x.grad, whole_of_chunks, "exact"),
        "scatter_of_gather": compare(mappings.scatter_to_sequence(gathered.detach(), group), local, "exact"),
        "gather_of_scatter": compare(mappings.gather_from_sequence(scattered.detach(), group), full, "exact"),
        "reduce_scatter": compare(reduced_scattered, chunk(summed, 1), "fp32", floor=amax(chunk(summed_terms, 1))),
        "reduce_scatter_backward": compare(partial.grad, whole_of_chunks, "exact"),
        "copy": compare(copied, full, "exact"),
        "copy_backward": compare(copied_x.grad, summed, "fp32", floor=sum_floor),
        "reduce": compare(reduced, summed, "fp32", floor=sum_floor),
        "reduce_backward": compare(reduced_x.grad, full, "exact"),
        "indivisible_refused": [float(2 - refused), 0.0, 0.0, "exact"],
    }


CHECKS = {"cross_entropy": check_cross_entropy, "head_and_loss": check_head_and_loss, "column": check_column,
          "row": check_row, "embedding": check_embedding, "sequence": check_sequence}


def run_case(case: dict, group) -> dict:
    try:
        return CHECKS[case["kind"]](case, group)
    except Exception:
        # The other ranks may be waiting in one of this case's collectives: stop (torchrun then stops them), naming
        # the case, rather than go on out of step with them.
        traceback.print_exc()
        print(f"rank {dist.get_rank()}: this case raised (replay it alone): {json.dumps(case)}", file=sys.stderr)
        shutdown_and_exit(1)


def worst_over_ranks(results: list[dict]) -> None:
    """Each measured number (errors, scales, floors), the largest over the ranks, in one all-reduce."""
    cells = [(m, q) for m in results for q, v in m.items() if isinstance(v, list)]
    values = torch.tensor([[m[q][0], m[q][1], m[q][2]] for m, q in cells], dtype=torch.float64).reshape(-1, 3)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    for (m, q), row in zip(cells, values.tolist()):
        m[q][:3] = row


def main() -> None:
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    # a rank left waiting in a collective (another one stopped) fails in a minute, not gloo's default 30
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))

    def check_cases() -> None:
        if any(case["tp"] != dist.get_world_size() for case in cases):
            raise ValueError(f"cases for another tp than this world of {dist.get_world_size()}")
        results = [run_case(case, dist.group.WORLD) for case in cases]
        worst_over_ranks(results)
        if dist.get_rank() == 0:
            out.write_text(json.dumps(results))
    run_worker(check_cases)


if __name__ == "__main__":
    main()
