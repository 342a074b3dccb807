"""Every parallel layout reproduces the single-process run: 5 AdamW steps of a tiny SmolLM2-shaped model (GQA, tied
embeddings, fp32, gradient clipping active) give the same loss at every step (relative 1e-5), the same final
weights (1e-5) and the same AdamW moments, assembled from the ranks' shards through `tp_shard_dim` and
`param_states()` (the contracts the checkpoint code builds on).

Pairs of layouts that must be bit-identical to each other: bf16 with and without `train.bf16_weight_cache` (under
ZeRO-1 the cache's weights are gathered in bf16 into the copies, the others' in fp32), and
ZeRO-1 with the weight all-gather overlapped with the next forward (`parallel.overlap_param_gather`) or waited for
at once (also under torch.compile).

Data-parallel reductions in bf16 (`parallel.grad_reduce_dtype`): exactly the bf16 sums of the ranks' rounded
gradients, and runs that follow the fp32 reduction.

One torchrun launch per world size runs all of its layouts (cost on 2 cores: ~15 s for 2 ranks, ~25 s for 4,
~35 s for 8).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_common import EOS, make_config, make_data, reference_run
from helpers import torchrun

WORKER = str(Path(__file__).resolve().parent / "dist_parallel_layouts.py")

# Layouts with tensor parallelism and no pipeline run 2 micro-batches per data-parallel rank (4 sequences each; the
# others 1 sequence, 8 per step, as the reference does): each TP collective costs ~0.5 ms on gloo here (~5 ms with 4
# ranks on 2 cores), and layers make several per micro-batch (tp4 took 10 s with 8, 2 s with 2). Gradient
# accumulation is still exercised, and validation's rounds are still padded (5 windows).
TP_MICRO_BATCHES = "train.micro_batch_size=4"
TP_DP2_MICRO_BATCHES = "train.micro_batch_size=2"
# train.compile layouts trace, decompose and partition the layers as Inductor does but run them with eager kernels:
# Inductor's C++ for each layout took ~60 s of the 2-rank launch's ~75 s on 2 cores (a fresh machine, no compile
# cache). Inductor's own code is tested in test_parallel_layers.py (the column linears, TP + SP),
# test_compute_weights.py, test_speedups.py and test_plan_memory_compiled.py, and on the GPU by tools/gpu_checks.sh.
COMPILED = "train.compile=true,train.compile_backend=aot_eager_decomp_partition"

LAYOUTS = {
    2: {
        "tp2": f"tp=2,{TP_MICRO_BATCHES}",
        "tp2_sp": f"tp=2,sequence_parallel=true,{TP_MICRO_BATCHES}",
        "pp2_1f1b": "pp=2,pp_schedule=1f1b",
        "pp2_afab": "pp=2,pp_schedule=afab",
        "dp2": "",
        "dp2_zero1": "zero_stage=1",
        "pp2_docs": f"pp=2,model.document_mask_eos_id={EOS}",
        # the head fused into the vocab-parallel loss, in chunks of tokens (parallel/cross_entropy.py)
        "tp2_sp_fused_loss": f"tp=2,sequence_parallel=true,train.loss_chunk_size=24,{TP_MICRO_BATCHES}",
        # the column linears' collectives inside their autograd function (column_parallel_matmul.py), under
        # torch.compile without a graph break
        "tp2_compiled": f"tp=2,{COMPILED},{TP_MICRO_BATCHES}",
        "tp2_sp_compiled": f"tp=2,sequence_parallel=true,{COMPILED},{TP_MICRO_BATCHES}",
        # under SP they gather their input again in backward; with recomputation they keep it gathered instead
        "tp2_sp_selective": f"tp=2,sequence_parallel=true,train.recompute=selective,{TP_MICRO_BATCHES}",
        "tp2_sp_full_recompute": f"tp=2,sequence_parallel=true,train.recompute=full,{TP_MICRO_BATCHES}",
    },
    4: {
        "tp4": f"tp=4,{TP_MICRO_BATCHES}",
        "pp4_interleaved": "pp=4,pp_schedule=interleaved,virtual_stages=2",
        # 2 micro-batches for 4 stages: the interleaved schedule runs them as one round (1F1B could not)
        "pp4_interleaved_2mb": "pp=4,pp_schedule=interleaved,virtual_stages=2,train.micro_batch_size=4",
        "tp2_pp2": "tp=2,pp=2",
        "tp2_dp2": f"tp=2,{TP_DP2_MICRO_BATCHES}",
        "pp2_dp2_zero1": "pp=2,zero_stage=1",
        "pp2_interleaved_dp2_zero1": "pp=2,pp_schedule=interleaved,virtual_stages=2,zero_stage=1",
        "tp2_sp_pp2_docs": f"tp=2,pp=2,sequence_parallel=true,model.document_mask_eos_id={EOS}",
    },
    8: {
        "tp2_pp2_dp2_sp_zero1": "tp=2,pp=2,pp_schedule=1f1b,sequence_parallel=true,zero_stage=1",
    },
}
ALL = [(world, name) for world, layouts in LAYOUTS.items() for name in layouts]

# bf16 layouts run with and without train.bf16_weight_cache (nanotronix/parallel/compute_weights.py): the cached
# copies must give bit-identical steps through pipeline stages, TP + SP and the ZeRO-1 all-gather of the weights.
CACHE_PAIRS = {
    2: {"pp2_1f1b_bf16": "pp=2,pp_schedule=1f1b,train.dtype=bfloat16"},
    4: {"tp2_sp_dp2_zero1_bf16": "tp=2,sequence_parallel=true,zero_stage=1,train.dtype=bfloat16,"
                                 f"{TP_DP2_MICRO_BATCHES}"},
}

# train.grad_accumulation_fusion (the wgrad GEMM accumulates into the fp32 buckets) on top of the weight cache,
# against the cached layout of CACHE_PAIRS: the same sums without the bf16 rounding, reported to the buckets so that
# their reductions still start during backward (TP + SP: gathered inputs and row-parallel weights; ZeRO-1: stale
# copies refreshed by the weight-gather hooks).
FUSION_PAIRS = {2: {"pp2_1f1b_bf16": "train.grad_accumulation_fusion=true"},  # torch.distributed.pipelining
                4: {"tp2_sp_dp2_zero1_bf16": "train.grad_accumulation_fusion=true"}}

# ZeRO-1 layouts with parallel.overlap_param_gather (the default) against the same layout waiting for every weight
# gather right after the update: bit-identical, and the overlapped gathers are really waited part by part.
OVERLAP_PAIRS = {
    2: {"dp2_zero1": "zero_stage=1",
        # the hook that waits runs outside the compiled layer: same graphs, no graph break inside the layer
        "dp2_zero1_compiled": f"zero_stage=1,{COMPILED}"},
    4: {"tp2_sp_dp2_zero1_bf16_cache": "tp=2,sequence_parallel=true,zero_stage=1,train.dtype=bfloat16,"
                                       f"train.bf16_weight_cache=true,{TP_DP2_MICRO_BATCHES}",
        # torch.distributed.pipelining runs the chunks: the parts' hooks still wait, two chunks per rank
        "pp2_interleaved_dp2_zero1": "pp=2,pp_schedule=interleaved,virtual_stages=2,zero_stage=1"},
}


# parallel.grad_reduce_dtype bfloat16 against the same layout reducing fp32: each bucket's reduced gradient is
# exactly the bf16 sum of the ranks' bf16-rounded gradients, and the run follows the fp32 one up to that rounding.
REDUCE_PAIRS = {2: {"dp2": "", "dp2_zero1": "zero_stage=1"},
                4: {"pp2_dp2_zero1": "pp=2,zero_stage=1"}}


@pytest.fixture(scope="module")
def references():
    """plain and document-masked single-process runs"""
    plain, docs = make_config(), make_config({"model.document_mask_eos_id": EOS})
    return {"plain": reference_run(plain, make_data(plain)), "docs": reference_run(docs, make_data(docs))}


@pytest.fixture(scope="module")
def reference(references):
    return references["plain"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world size -> output folder of its torchrun launch (launched lazily, once)."""
    done: dict[int, Path] = {}

    def get(world: int) -> Path:
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}")
            specs = [f"{name}:{spec}" for name, spec in LAYOUTS[world].items()]
            for name, spec in CACHE_PAIRS.get(world, {}).items():
                specs += [f"{name}:{spec}", f"{name}_cache:{spec},train.bf16_weight_cache=true"]
                if name in FUSION_PAIRS.get(world, {}):
                    specs.append(f"{name}_fused:{spec},train.bf16_weight_cache=true,{FUSION_PAIRS[world][name]}")
            for name, spec in REDUCE_PAIRS.get(world, {}).items():
                specs.append(f"{name}_bf16reduce:{spec},grad_reduce_dtype=bfloat16")
            for name, spec in OVERLAP_PAIRS.get(world, {}).items():
                if not any(s.startswith(f"{name}:") for s in specs):
                    specs.append(f"{name}:{spec}")
                specs.append(f"{name}_waited:{spec},overlap_param_gather=false")
            proc = torchrun(world, [WORKER, "--out", str(out), *specs], timeout=300)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
            done[world] = out
        return done[world]
    return get


def assemble(folder: Path, key: str):
    """Logical tensors from every rank's shards: concatenate TP shards along tp_shard_dim; check that every other
    holder (DP replicas, TP replicas of replicated params, the other end of a tied embedding) agrees exactly."""
    ranks = [torch.load(f, weights_only=False) for f in sorted(folder.glob("rank*.pt"))]
    names = sorted({n for r in ranks for n in r["params"]})
    out = {}
    for name in names:
        holders = [r for r in ranks if name in r["params"]]
        dim = holders[0]["tp_shard_dim"][name]
        copies = {}
        for r in holders:
            c = r["coords"]
            copies.setdefault((c["dp"], c["pp"]), {})[c["tp"]] = (
                r["params"][name] if key == "params" else r["states"][name][key])
        tensors = []
        for by_tp in copies.values():
            shards = [by_tp[t] for t in sorted(by_tp)]
            if dim is None:
                for s in shards[1:]:
                    assert torch.equal(s, shards[0]), f"{name}: TP replicas differ"
                tensors.append(shards[0])
            else:
                tensors.append(torch.cat(shards, dim=dim))
        for t in tensors[1:]:
            torch.testing.assert_close(t, tensors[0], rtol=0, atol=1e-6, msg=f"{name}: replicas differ")
        out[name] = tensors[0]
    return out


@pytest.mark.parametrize("world, layout", ALL, ids=[name for _, name in ALL])
def test_layout_matches_single_process(world, layout, runs, references):
    ref_losses, ref_norms, ref_weights, ref_states, ref_val = references["docs" if layout.endswith("_docs")
                                                                          else "plain"]
    folder = runs(world) / layout
    metrics = json.loads((folder / "metrics.json").read_text())
    for step, (got, want) in enumerate(zip(metrics["losses"], ref_losses), start=1):
        assert got == pytest.approx(want, rel=1e-5), f"step {step}: loss {got} != {want}"
    assert len(metrics["losses"]) == len(ref_losses)
    assert metrics["grad_norms"] == pytest.approx(ref_norms, rel=1e-4)
    # validation in the layout (forward only, through its pipeline schedule, padded rounds) after step 3, then
    # training on, and after the last step: the plain forward's loss on the same held-out windows
    assert metrics["val_losses"] == pytest.approx(ref_val, rel=1e-5) and len(ref_val) == 2

    weights = assemble(folder, "params")
    assert set(weights) == set(ref_weights)
    for name, want in ref_weights.items():
        assert weights[name].shape == want.shape, name
        torch.testing.assert_close(weights[name], want, rtol=1e-5, atol=1e-5, msg=name)
    for key in ("exp_avg", "exp_avg_sq"):
        states = assemble(folder, key)
        for name, want in ref_states.items():
            torch.testing.assert_close(states[name], want[key], rtol=1e-4, atol=1e-7, msg=f"{name}.{key}")


@pytest.mark.parametrize("layout", ["tp2_compiled", "tp2_sp_compiled"])
def test_compiled_tensor_parallel_layers_are_one_graph(runs, layout):
    """train.compile with tensor parallelism, with and without sequence parallelism: the layers' collectives (the
    column linears' all-reduce or gathers, forward and backward, the row linears' reductions) trace into the
    compiled layer: one graph for all layers, one for the validation's forward without gradients, none for graph
    breaks."""
    files = sorted((runs(2) / layout).glob("rank*.pt"))
    assert len(files) == 2, files  # (none: the loop below checked nothing)
    for f in files:
        assert torch.load(f, weights_only=False)["unique_graphs"] == 2, f.name


@pytest.mark.parametrize("world, layout", [(w, n) for w, n in ALL if "dp2" in n], ids=lambda v: str(v))
def test_data_parallel_reduction_overlaps_backward(world, layout, runs):
    """Bucketed gradient reduction: every rank's optimizer state survives param_states -> load_param_states, the
    first bucket's reduction starts before backward has produced the step's last gradient (overlap), and without
    pipelining (micro-batches strictly one after another) no bucket is reduced before the last micro-batch."""
    files = sorted((runs(world) / layout).glob("rank*.pt"))
    assert len(files) == world, files  # (none: the loop below checked nothing)
    for f in files:
        r = torch.load(f, weights_only=False)
        assert r["states_roundtrip"], f.name
        assert r["copied_grads"] == 0, f"{f.name}: gradients were copied instead of accumulated in the bucket"
        total = r["microbatches"] * r["num_params"]
        regular = [b["launched_after"] for b in r["buckets"] if not b["deferred"]]
        assert len(regular) >= 2 and all(n is not None for n in regular), r["buckets"]
        assert regular[0] < total, (f.name, regular, total)
        assert regular == sorted(regular)
        if "pp" not in layout:
            assert min(regular) > (r["microbatches"] - 1) * r["num_params"], (f.name, regular, total)


@pytest.mark.parametrize("world, layout", [(w, n) for w, pairs in CACHE_PAIRS.items() for n in pairs],
                         ids=lambda v: str(v))
def test_bf16_weight_cache_is_bit_identical(world, layout, runs):
    plain, cached = runs(world) / layout, runs(world) / f"{layout}_cache"
    assert json.loads((cached / "metrics.json").read_text()) == json.loads((plain / "metrics.json").read_text())
    for a, b in zip(sorted(plain.glob("rank*.pt")), sorted(cached.glob("rank*.pt")), strict=True):
        ra, rb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
        assert ra["cached_gradients"] == 0 and rb["cached_gradients"] > 0, b.name
        assert rb["copied_grads"] == 0, b.name
        # ZeRO-1: the decoder linears' buckets were gathered in bf16 straight into their twins (the weights read
        # here were gathered in fp32 only for this read, by wait_for_weights), the other buckets in fp32
        assert not any(ra["twin_gathered"])
        if "zero1" in layout:
            assert 0 < sum(rb["twin_gathered"]) < len(rb["twin_gathered"]), rb["twin_gathered"]
        else:
            assert not any(rb["twin_gathered"])
        for name, want in ra["params"].items():
            assert torch.equal(rb["params"][name], want), f"{b.name}: {name}"
        for name in ra["states"]:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(rb["states"][name][key], ra["states"][name][key]), f"{b.name}: {name}.{key}"


@pytest.mark.parametrize("world, layout", [(w, n) for w, pairs in FUSION_PAIRS.items() for n in pairs],
                         ids=lambda v: str(v))
def test_fused_grad_accumulation_follows_the_cache(world, layout, runs, reference):
    cached, fused = runs(world) / f"{layout}_cache", runs(world) / f"{layout}_fused"
    want, got = (json.loads((f / "metrics.json").read_text())["losses"] for f in (cached, fused))
    assert got[0] == want[0] and got == pytest.approx(want, rel=1e-3)  # the same forward, then close updates
    cfg = make_config()
    torch.manual_seed(cfg.train.seed)
    from nanotronix.model import build_model
    init = dict(build_model(cfg.model, "sdpa").named_parameters())
    a, b = assemble(cached, "params"), assemble(fused, "params")
    for name in a:  # apart only by the gradients' bf16 rounding (amplified by Adam): far less than the steps moved
        assert (b[name] - a[name]).norm() < 0.1 * (reference[2][name] - init[name]).norm(), name
    for f in sorted(fused.glob("rank*.pt")):
        r = torch.load(f, weights_only=False)
        assert r["cached_gradients"] > 0 and r["copied_grads"] == 0, f.name
        total = r["microbatches"] * r["num_params"]
        regular = [b["launched_after"] for b in r["buckets"] if not b["deferred"]]
        assert regular[0] < total and regular == sorted(regular), (f.name, regular, total)  # during backward


@pytest.mark.parametrize("world, layout", [(w, n) for w, pairs in REDUCE_PAIRS.items() for n in pairs],
                         ids=lambda v: str(v))
def test_bf16_gradient_reduction(world, layout, runs, reference):
    fp32, bf16 = runs(world) / layout, runs(world) / f"{layout}_bf16reduce"
    ranks = [torch.load(f, weights_only=False) for f in sorted(bf16.glob("rank*.pt"))]
    # exact: per pipeline stage, the DP ranks' fp32 sums rounded to bf16 and added in bf16 (one addition per element
    # for dp 2, so the order cannot matter), then widened back to fp32
    checked = 0
    for pp_rank in {r["coords"]["pp"] for r in ranks}:
        group = sorted((r for r in ranks if r["coords"]["pp"] == pp_rank), key=lambda r: r["coords"]["dp"])
        assert len(group) == 2
        for index, (start, end, shard) in group[0]["reduced"].items():
            inputs = [r["reduction_inputs"][index] for r in group]
            want = (inputs[0].bfloat16() + inputs[1].bfloat16()).float()
            for r in group:
                start, end, shard = r["reduced"][index]
                assert torch.equal(shard, want[start:end]), (layout, pp_rank, index)
            assert not torch.equal(want, inputs[0] + inputs[1]), index  # really rounded
            checked += 1
    assert checked >= 2
    # the run: the same first loss, then apart only by that rounding (amplified by Adam), far less than it moved
    want, got = (json.loads((f / "metrics.json").read_text())["losses"] for f in (fp32, bf16))
    assert got[0] == want[0] and got == pytest.approx(want, rel=1e-3)
    cfg = make_config()
    torch.manual_seed(cfg.train.seed)
    from nanotronix.model import build_model
    init = dict(build_model(cfg.model, "sdpa").named_parameters())
    a, b = assemble(fp32, "params"), assemble(bf16, "params")
    for name in a:
        assert (b[name] - a[name]).norm() < 0.1 * (reference[2][name] - init[name]).norm(), name
    assert any(not torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("world, layout", [(w, n) for w, pairs in OVERLAP_PAIRS.items() for n in pairs],
                         ids=lambda v: str(v))
def test_overlapped_weight_gather_is_bit_identical(world, layout, runs):
    """ZeRO-1 weight all-gathers left running after the update and waited by each model part's forward give the
    same losses, weights and moments as waiting for them at once; when a step returns they are all still pending,
    and the next forward waited for them one part at a time (the first part for its own weights only)."""
    overlapped, waited = runs(world) / layout, runs(world) / f"{layout}_waited"
    assert json.loads((overlapped / "metrics.json").read_text()) == json.loads((waited / "metrics.json").read_text())
    for a, b in zip(sorted(waited.glob("rank*.pt")), sorted(overlapped.glob("rank*.pt")), strict=True):
        ra, rb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
        for name, want in ra["params"].items():
            assert torch.equal(rb["params"][name], want), f"{b.name}: {name}"
        for name in ra["states"]:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(rb["states"][name][key], ra["states"][name][key]), f"{b.name}: {name}.{key}"
        assert ra["gathers_pending"] == 0 and rb["gathers_pending"] == len(rb["buckets"]), b.name
        # compiled: one graph for all layers (the overlapped layout runs first in its process, so it compiles it),
        # and one for the validation's forward without gradients (dynamo guards on the grad mode)
        assert rb["unique_graphs"] == (2 if "compiled" in layout else 0), (b.name, rb["unique_graphs"])
        after = rb["gathers_waited_after"]
        assert all(n is not None for n in after) and min(after) == 1 and max(after) > 1, (b.name, after)


def test_reference_run_is_a_real_test(reference):
    """The comparison above would catch a layout that does nothing or skips clipping: every weight tensor moves
    by far more than the tolerance, and clipping is active (the norm exceeds clip_grad=1.0 on some step)."""
    losses, norms, weights, _, val_losses = reference
    cfg = make_config()
    torch.manual_seed(cfg.train.seed)
    from nanotronix.model import build_model
    init = dict(build_model(cfg.model, "sdpa").named_parameters())
    assert len(set(losses)) == len(losses)
    assert max(norms) > cfg.optimizer.clip_grad
    assert all((weights[n] - init[n]).abs().max() > 5e-4 for n in weights)
    assert abs(val_losses[0] - val_losses[1]) > 1e-3, val_losses  # the two validations see different weights


def test_document_masking_changes_the_run(references):
    """The document-masked layouts compare with a reference that differs from the plain one (the planted EOS
    tokens split the windows), so they test the masking too."""
    plain, docs = references["plain"][0], references["docs"][0]
    assert all(abs(a - b) > 1e-4 for a, b in zip(plain, docs)), (plain, docs)
