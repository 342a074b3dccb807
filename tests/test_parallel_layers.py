"""Each tensor-parallel layer and the vocab-parallel cross entropy against its dense PyTorch equivalent, forward
and gradients, over 2 gloo ranks (one torchrun launch, ~10 s on 2 cores): column-parallel linear (replicated and
sequence-sharded input), row-parallel linear (all-reduce and sequence reduce-scatter), vocab-parallel embedding
(both), vocab-parallel cross entropy (with ignored tokens, with logits large enough to overflow a naive exp, and its
mean over no counted token: nan with zero gradients), the sequence gather/scatter collectives, and the head fused
into the vocab-parallel loss in chunks of tokens (train.loss_chunk_size; both head inputs, large logits, traced by
torch.compile)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import torchrun

WORKER = str(Path(__file__).resolve().parent / "dist_parallel_layers.py")
CHECKS = ["column_copy", "column_gather_sequence", "row_reduce", "row_reduce_scatter_sequence", "embedding",
          "embedding_sequence_parallel", "cross_entropy", "cross_entropy_large_logits", "mappings_sequence",
          "fused_head_loss_copy", "fused_head_loss_gather_sequence", "fused_head_loss_large_logits",
          "fused_head_loss_compiled"]
SHARD_DIMS = {"column_copy": 0, "column_gather_sequence": 0, "row_reduce": 1, "row_reduce_scatter_sequence": 1,
              "embedding": 0, "embedding_sequence_parallel": 0, "fused_head_loss_copy": 0,
              "fused_head_loss_gather_sequence": 0}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_layers") / "results.json"
    proc = torchrun(2, [WORKER, str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {**json.loads(out.read_text()), "log": proc.stdout + proc.stderr}


@pytest.mark.parametrize("check", CHECKS)
def test_tensor_parallel_matches_dense(results, check):
    values = results["checks"][check]
    assert values["scale"] > 1e-3  # the dense gradients compared against are not all zero
    errors = {k: v for k, v in values.items() if k not in ("scale", "shard_dim")}
    assert errors, check
    for name, error in errors.items():
        assert error <= 1e-5 * max(1.0, values["scale"]), f"{check}: {name} differs from dense by {error}"
    if check in SHARD_DIMS:
        assert values["shard_dim"] == SHARD_DIMS[check]


def test_vocab_parallel_mean_over_no_counted_token_is_nan_with_zero_gradients(results):
    """F.cross_entropy's mean over labels all at the ignore index -100: nan, and gradients of zero, not the nan of
    0 / 0 (found by test_parallel_properties.py)."""
    values = results["checks"]["cross_entropy_nothing_counted"]
    assert values["loss_is_nan"] == values["reference_loss_is_nan"] == 1.0
    assert values["reference_grad"] == 0.0
    assert values["grad_logits"] == 0.0, f"gradients differ from F.cross_entropy's zeros by {values['grad_logits']}"


@pytest.mark.parametrize("mode", ["copy", "gather_sequence"])
def test_fused_head_loss_in_bf16_is_the_collective_then_the_loss(results, mode):
    """The fused loss under TP with bf16 matmuls (train.loss_chunk_size, train.dtype bfloat16): its input
    collectives (the gather in bf16, the kept bf16 dX scaled and summed over the ranks in fp32) give bit for bit
    the loss and gradients of the plain fp32 collective followed by the same loss."""
    values = results["checks"][f"fused_head_loss_bf16_{mode}"]
    assert values["scale"] > 1e-3
    for name in ("forward", "grad_input", "grad_weight"):
        assert values[name] == 0.0, f"{mode}: {name} differs by {values[name]}"


@pytest.mark.parametrize("case", [f"{mode}_{dtype}{variant}" for dtype, variants in (
    ("float32", ("", "_acc")), ("bfloat16", ("", "_cache", "_cache_acc")))
    for mode in ("copy", "regather", "keep") for variant in variants])
def test_column_parallel_matmul_is_the_collective_and_linear(results, case):
    """The column-parallel linears' matmul with its collective in one function (`column_parallel_matmul`) gives
    bit-identical outputs and gradients to copy_to_tp / gather_from_sequence + F.linear (fp32; bf16 autocast,
    which casts after the collective where this casts before; the weight gradient returned or accumulated into an
    fp32 buffer), and keeps for backward the same input as that path, except under sequence parallelism: only this
    rank's sequence shard in the compute dtype (1/tp of it), or with keep_gathered the same gathered input."""
    values = results["column_parallel_matmul"][case]
    assert values["scale"] > 1e-3
    for name in ("forward", "grad_input", "grad_weight"):
        assert values[name] == 0.0, f"{case}: {name} differs by {values[name]}"
    mode, world = case.split("_")[0], results["world_size"]
    whole = values["input_bytes"] * (1 if mode == "copy" else world)
    assert values["collective_path_kept_bytes"] == whole, values
    assert values["kept_input_bytes"] == (values["input_bytes"] if mode == "regather" else whole), values


@pytest.mark.parametrize("case", [f"{mode}_{backend}" for backend in ("inductor", "aot_eager")
                                  for mode in ("regather", "keep", "regather_acc")])
def test_compiled_column_parallel_matmul_keeps_what_eager_keeps(results, case):
    """Under torch.compile (Inductor, as training compiles, and aot_eager: the min-cut and the default partitioner)
    the function gives the eager outputs and gradients, bit for bit, keeps for backward the input that eager keeps
    (this rank's sequence shard, or with keep_gathered the gathered input), and runs the same all-gathers: one in
    the forward, and the shard's again in the backward. Without the selective-checkpoint policy of
    column_parallel_matmul.py the compiled graph kept the gathered input (the partitioner saved the forward's gather
    rather than run it again) and ran no gather in the backward."""
    values = results["column_parallel_matmul_compiled"][case]
    assert values["scale"] > 1e-3
    for name in ("forward", "grad_input", "grad_weight"):
        assert values[name] == 0.0, f"{case}: {name} differs by {values[name]}"
    keep = case.startswith("keep")
    assert values["kept_input_bytes"] == values["input_bytes"] * (results["world_size"] if keep else 1), values
    gathers = (1.0, 0.0 if keep else 1.0)
    assert (values["eager_forward_gathers"], values["eager_backward_gathers"]) == gathers, values
    assert (values["forward_gathers"], values["backward_gathers"]) == gathers, values


def test_compiled_column_parallel_matmul_logs_no_checkpoint_advice(results):
    """The compiled sequence-parallel path passes a context_fn to torch.utils.checkpoint, on which torch logs once
    per process, on every rank, advice to keep in-place ops out of the region (it has none): not in the ranks'
    output."""
    assert results["column_parallel_matmul_compiled"]["regather_inductor"]["backward_gathers"] == 1.0
    assert "context_fn is passed to torch.utils.checkpoint" not in results["log"]


@pytest.mark.parametrize("case", [f"{mode}_{x_grad}_{weight}" for mode in ("copy", "regather", "keep")
                                  for x_grad, weight in (("input", "grad"), ("input", "frozen"), ("input", "acc"),
                                                         ("no_input", "grad"), ("no_input", "acc"))])
def test_column_parallel_matmul_waits_for_every_collective_it_starts(results, case):
    """Whichever of its inputs needs a gradient (the weight's returned, accumulated into an fp32 buffer, or none),
    the function's backward returns only after every collective it started asynchronously has been waited for (on
    NCCL the work keeps its tensors until then, and the result is complete only then), starts the input gradient's
    reduction only when that gradient is asked for, and gathers the shard again only under sequence parallelism
    without keep_gathered; its gradients are bit-identical to the collective + linear path's."""
    values = results["column_parallel_matmul_waits"][case]
    mode, x_grad = case.split("_")[0], not case.split("_", 1)[1].startswith("no_input")
    assert values["unwaited"] == 0.0, values
    assert values["async_started"] == (mode == "regather") + x_grad, values
    assert ("grad_input" in values) == x_grad and ("grad_weight" in values) == (not case.endswith("frozen"))
    for name in ("grad_input", "grad_weight"):
        assert values.get(name, 0.0) == 0.0, f"{case}: {name} differs by {values[name]}"


def test_blocking_collectives_use_nothing_torch_returns(monkeypatch):
    """A collective started with async_op=False has run when it returns; what torch returns then is no Work to wait
    for (None in eager torch, a tensor from torch 2.11's dynamo, the GPU machine's: every compiled TP + SP layout
    failed there with "'Tensor' object has no attribute 'wait'"). Stood in for by collectives over a group of one
    that return their output, as 2.11's traced ones do; with async_op=True the Work returned is waited for once."""
    import torch
    from nanotronix.parallel import mappings

    waited = []

    class Work:
        def wait(self):
            waited.append(True)

    def flat(out, inp, group=None, async_op=False):
        out.copy_(inp)
        return Work() if async_op else out

    monkeypatch.setattr(mappings, "group_size", lambda group: 1)
    monkeypatch.setattr(mappings, "all_gather_flat", flat)
    monkeypatch.setattr(mappings, "reduce_scatter_flat", flat)
    monkeypatch.setattr(mappings.dist, "all_reduce", lambda x, group=None, async_op=False: Work() if async_op else x)
    x = torch.randn(2, 4, 3)
    for async_op in (False, True):
        for start in (mappings.start_all_gather_seq, mappings.start_reduce_scatter_seq, mappings.start_all_reduce):
            assert torch.equal(start(x.clone(), None, async_op=async_op)(), x), (start.__name__, async_op)
    assert len(waited) == 3
