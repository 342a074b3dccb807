"""tools/plan.py (its memory model, tools/_plan_memory.py) counts activations as eager PyTorch keeps them
(tests/test_plan_memory.py measures that). Under train.compile, which the SmolLM2 recipes use, AOTAutograd's
partitioner chooses what a compiled decoder layer saves for backward (it recomputes cheap elementwise results from
fewer saved tensors; under sequence parallelism the column linears keep their sequence shard, as eager does, through
column_parallel_matmul.py's checkpoint policy): so the plan's figure is an upper bound there. Measured here on
tests/test_plan_memory.py's model, bf16, one micro-batch, the tensors the layers save for backward (autograd's
saved-tensor hooks see the compiled graphs' saves too; each storage once, autocast's bf16 weight copies apart, which
the plan counts on their own), per layer from a 1- and a 3-layer model; at tp 1 and, on 2 gloo ranks
(tests/dist_plan_memory_compiled.py), at tp 2 with sequence parallelism (~25 s on 2 cores). A compiled layer that kept
the column linears' gathered inputs kept more than the count at tp 4 on a model with a narrow MLP (103%, measured
2026-12-06 with 4 ranks; with the policy 59%): not run here, as 4 ranks double this file's time on 2 cores, while
tests/test_parallel_layers.py holds the policy itself (the shard kept under torch.compile).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch

from nanotronix.config import config_from_dict
from nanotronix.model import build_model
from nanotronix.parallel import ParallelContext, parallelize
from helpers import torchrun
from test_plan_memory import MODEL, SEQ, TOKENS, rope_tables

MICRO_BATCH = 2
# name -> (model, ParallelConfig fields)
LAYOUTS = {"tp1": (MODEL, None), "tp2_sequence_parallel": (MODEL, {"tp": 2, "sequence_parallel": True})}


def run_config(layers: int, compiled: bool, parallel: Optional[dict] = None, model: dict = MODEL):
    """One micro-batch of `model` (tests/test_plan_memory.py's) in bf16; `parallel`: ParallelConfig fields."""
    return config_from_dict({"model": {**model, "num_hidden_layers": layers}, "parallel": parallel or {},
                             "train": {"seq_len": SEQ, "global_batch_size": MICRO_BATCH,
                                       "micro_batch_size": MICRO_BATCH, "dtype": "bfloat16", "compile": compiled}})


def saved_bytes(layers: int, compiled: bool, parallel: Optional[dict] = None, model_fields: dict = MODEL) -> int:
    """Bytes of the storages one micro-batch's forward and loss save for backward, weights and their bf16 copies
    apart (with `parallel`, a process group of its size must be up)."""
    cfg = run_config(layers, compiled, parallel, model_fields)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), ParallelContext.build(cfg), cfg)
    params = list(model.parameters())
    storages = {p.untyped_storage().data_ptr() for p in params}
    # autocast's casts of the weights, as the matmuls save them (transposed, too)
    copies = [c for p in params for c in {p.detach().to(torch.bfloat16), p.detach().to(torch.bfloat16).t()}]
    ids = torch.randint(0, model_fields["vocab_size"], (MICRO_BATCH, SEQ + 1))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        is_copy = t.dtype == torch.bfloat16 and any(c.shape == t.shape and torch.equal(c, t) for c in copies)
        if storage.data_ptr() not in storages and not is_copy:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    for _ in range(2):  # the first run compiles (and the measurement is the second's)
        saved.clear()
        model.grads.start(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.runner._loss_fn(model.chunks[0](ids[:, :-1]), ids[:, 1:])
        loss.backward()
        model.grads.finish()
    return sum(saved.values())


def per_layer_bytes(model: dict = MODEL, parallel: Optional[dict] = None) -> dict[str, float]:
    """bytes a layer saves per token of the micro-batch: eager and compiled."""
    out = {}
    for compiled in (False, True):
        one, three = saved_bytes(1, compiled, parallel, model), saved_bytes(3, compiled, parallel, model)
        out["compiled" if compiled else "eager"] = (three - one) / 2 / (MICRO_BATCH * SEQ)
    return out


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """layout name -> what its gloo ranks measured (one torchrun launch per layout, as many ranks as its tp)."""
    def get(layout: str) -> dict[str, float]:
        out = tmp_path_factory.mktemp(layout) / "per_layer.json"
        worker = str(Path(__file__).resolve().parent / "dist_plan_memory_compiled.py")
        proc = torchrun(LAYOUTS[layout][1]["tp"], [worker, str(out), layout], timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads(out.read_text())
    return get


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_compiled_layer_keeps_at_most_the_plans_count(plan_memory, layout, distributed):
    """The plan's count for a compiled run is eager's: under sequence parallelism a compiled layer's column linears
    keep their sequence shard, as the eager function does (column_parallel_matmul.py's checkpoint policy). Without
    that policy the compiled graph kept the gathered input (more than this count at tp 4 on a narrow-MLP model)."""
    model, parallel = LAYOUTS[layout]
    measured = distributed(layout) if parallel else per_layer_bytes()
    eager, _ = plan_memory.activation_bytes_per_token_per_layer(run_config(1, False, parallel, model))
    compiled, _ = plan_memory.activation_bytes_per_token_per_layer(run_config(1, True, parallel, model))
    # the measurement is a real one: eager, the same hooks see the plan's count and the layer's bf16 RoPE tables
    # (test_plan_memory.rope_tables: per token of its micro-batch)
    assert MICRO_BATCH * SEQ == TOKENS
    assert measured["eager"] == pytest.approx(eager + rope_tables("bfloat16", "none", model), rel=0.01)
    # measured (torch 2.13, Inductor on CPU): 69% of the plan's count at tp 1, 61% at tp 2 with SP
    assert 0.3 * compiled < measured["compiled"] <= compiled, (measured, compiled)
