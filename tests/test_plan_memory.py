"""tools/plan.py's memory terms (tools/_plan_memory.py) against what the trainer's model really keeps for backward,
on CPU.

The model is built and parallelised as the trainer does (`parallelize`, which applies train.recompute through
`speedups.apply_recompute`), and one micro-batch runs forward and loss as `MicroBatchRunner.run` does. A dispatch
mode (tests/live_storages.py) notes every storage an op makes (a weak reference: it keeps nothing alive); what is
still alive when the loss is ready (the loss put aside) is what autograd keeps for backward, however it keeps it:
saved tensors, the views they hold, recompute's inputs and selective recompute's cache (saved_tensors_hooks would
miss the last two: checkpointing installs hooks of its own). Each storage counts once; the bf16 weight copies
(casts of a parameter) count apart from activations. Per layer: the difference between a 3-layer and a 1-layer
model, halved. Attention is CPU SDPA's flash kernel (causal, no mask), which keeps q, k, v, the output and the
log-sum-exp as the CUDA flash and memory-efficient kernels do. ~15 s, and the parameters per GPU of tp 2 and pp 2
layouts (two gloo ranks, ~30 s).
"""
from __future__ import annotations

import gc
import json

import pytest
import torch

from helpers import two_gloo_ranks
from live_storages import LiveStorages
from nanotronix.config import config_from_dict
from nanotronix.model import build_model
from nanotronix.parallel import ParallelContext, parallelize

# a small Llama with GQA (2 query heads per KV head) and a vocabulary large enough that the loss term is seen
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 2000, "max_position_embeddings": 256, "init_std": 0.02, "rope_theta": 10000.0,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
SEQ, MICRO_BATCH = 256, 2
TOKENS = SEQ * MICRO_BATCH


def measure(layers: int, dtype: str, recompute: str = "none", loss_chunk_size: int = 0) -> dict:
    """What one micro-batch's forward and loss leave for backward on a model of `layers` layers (bytes), and the
    peak of the head and loss (from the final norm's output on) while they run."""
    cfg = config_from_dict({"model": {**MODEL, "num_hidden_layers": layers},
                            "train": {"seq_len": SEQ, "global_batch_size": MICRO_BATCH,
                                      "micro_batch_size": MICRO_BATCH, "dtype": dtype, "recompute": recompute,
                                      "loss_chunk_size": loss_chunk_size}})
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), ParallelContext.build(cfg), cfg)
    chunk = model.chunks[0]
    ids = torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, SEQ + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    storages = LiveStorages({p.untyped_storage().data_ptr() for p in model.parameters()})
    chunk.norm.register_forward_hook(lambda *_: storages.mark("head and loss"))
    with storages:
        storages.mark("forward")
        loss = model.runner._loss_fn(chunk(x), y)  # MicroBatchRunner.run's forward, before its loss.backward()
    gc.collect()
    activations, copies = storages.alive()
    activations -= loss.untyped_storage().nbytes()
    return {"config": cfg, "activations": activations, "weight_copies": copies, "peak": storages.peaks["forward"],
            "loss_peak": storages.peaks["head and loss"], "ops": storages.ops}


def rope_tables(dtype: str, recompute: str, model: dict = MODEL) -> float:
    """Bytes per token and layer the plan leaves out: under autocast `apply_rope` casts cos and sin ([S, head_dim])
    to bf16 for q and again for k, and the multiplications keep the four casts (one set per sequence position, not
    per token of the micro-batch: <1% at the recipes' sizes); recompute makes them again in the backward."""
    if dtype != "bfloat16" or recompute != "none":
        return 0.0
    return 4 * SEQ * (model["hidden_size"] // model["num_attention_heads"]) * 2 / TOKENS


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_a_layer_keeps_what_the_plan_says(plan_memory, dtype, recompute):
    one, three = measure(1, dtype, recompute), measure(3, dtype, recompute)
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in three["ops"]  # the trainer's kernel
    per_layer = (three["activations"] - one["activations"]) / 2 / TOKENS
    kept, full = plan_memory.activation_bytes_per_token_per_layer(three["config"])
    assert per_layer == pytest.approx(kept + rope_tables(dtype, recompute), rel=0.01)
    if recompute == "none":
        assert kept == full


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("loss_chunk_size", [0, 128])
def test_the_forward_peak_is_the_plans_activations(plan_memory, dtype, recompute, loss_chunk_size):
    """Without recompute the forward's peak is at its end, the loss running: every layer's set, the final norm's and
    the head + loss at their peak, the plan's activations. With recompute a layer's whole set also exists while it
    runs: the peak lies between the plan's end-of-forward figure and its activations, which add one layer's set
    (rebuilt in the backward)."""
    got = measure(3, dtype, recompute, loss_chunk_size)
    cfg = got["config"]
    kept, full = plan_memory.activation_bytes_per_token_per_layer(cfg)
    planned = plan_memory.memory_plan(cfg, 1, 1)["bytes"]["activations"]
    # beside the plan's terms: the bf16 RoPE tables (above), the labels (int64), the fp32 RoPE tables (recompute's
    # inputs), and on CPU the fused loss's weight gradient (`cpu_wgrad`)
    extra = 3 * TOKENS * rope_tables(dtype, recompute) + cpu_wgrad(dtype, loss_chunk_size)
    if recompute == "none":
        assert got["peak"] == pytest.approx(planned + extra, rel=0.02)
    else:
        assert planned - TOKENS * (full - kept) < got["peak"] < planned


def cpu_wgrad(dtype: str, loss_chunk_size: int) -> int:
    """Bytes the fused loss's peak has on CPU only, under bf16: the weight gradient of a chunk
    (kernels/reference.py) casts the chunk's logit gradient and input to fp32 (the first as large as the fp32 logits,
    already freed; the second [chunk, d] fp32), beside the chunk's dX; CUDA's GEMM accumulates in fp32 without
    copies."""
    return loss_chunk_size * MODEL["hidden_size"] * (4 + 2) if dtype == "bfloat16" and loss_chunk_size else 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("loss_chunk_size", [0, 128])
def test_the_head_and_loss_peak_is_the_plans(plan_memory, dtype, loss_chunk_size):
    """From the final norm's output on: the plain head's logits, their fp32 copy and log-softmax (and the head's
    input cast to bf16, which the plan counts with the final norm); the fused loss's one chunk of logits, their
    gradient and the chunk's input or dX, with the whole dW and dX. Besides them only a few small tensors (labels,
    1/count, log-sum-exp)."""
    got = measure(1, dtype, "none", loss_chunk_size)
    cfg = got["config"]
    head_input = 2 * MODEL["hidden_size"] * TOKENS if dtype == "bfloat16" and loss_chunk_size == 0 else 0
    planned = plan_memory.loss_bytes(cfg, TOKENS) + head_input + cpu_wgrad(dtype, loss_chunk_size)
    assert got["loss_peak"] == pytest.approx(planned, rel=0.01)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("loss_chunk_size", [0, 128])
def test_bf16_weight_copies_are_the_plans(plan_memory, recompute, loss_chunk_size):
    """Autocast's bf16 copies of the weights that the forward leaves for the backward: every decoder linear's and
    the head's without recompute; with it only the head's (the layers' are made again in their backward, one layer
    at a time: the plan counts one layer's), and the fused loss frees the head's before the backward (the plan
    counts it: it exists while the loss runs). The norms' weights are never cast."""
    got = measure(3, "bfloat16", recompute, loss_chunk_size)
    cfg = got["config"]
    planned = plan_memory.memory_plan(cfg, 1, 1)["bytes"]["weights_bf16_copies"]
    d, v = MODEL["hidden_size"], MODEL["vocab_size"]
    one_layer = 2 * plan_memory.layer_linear_params(cfg)
    head = 0 if loss_chunk_size else 2 * v * d
    if recompute == "none":
        assert got["weight_copies"] == 3 * one_layer + head
    else:
        assert got["weight_copies"] == head
    held_in_backward = got["weight_copies"] + (one_layer if recompute != "none" else 0)
    assert planned == held_in_backward + (2 * v * d if loss_chunk_size else 0)



PARAMETERS_PER_RANK = """
import json, sys
from datetime import timedelta
import torch.distributed as dist
from nanotronix.config import config_from_dict
from nanotronix.model import build_model
from nanotronix.parallel import ParallelContext, parallelize

rank, rendezvous = int(sys.argv[1]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=60))
for tree in json.loads(%r):
    cfg = config_from_dict(tree)
    model = parallelize(build_model(cfg.model), ParallelContext.build(cfg), cfg)
    print(json.dumps(sum(p.numel() for p in model.parameters())))
dist.destroy_process_group()
"""


def test_parameters_per_gpu_are_the_parallel_models(plan_memory, tmp_path):
    """The plan's parameters on the GPU it reports (every TP rank alike; the pipeline stage it names) against those
    of the part `parallelize` gives that rank: tp 2 with an untied head, pp 2 with a tied one (both ends hold it),
    and pp 2 with a head that costs ~5 layers, so that the first stage holds 7 of the 8 layers (the trainer's
    partition balances compute, not layers)."""
    trees = [{"model": {**MODEL, "num_hidden_layers": layers, "tie_word_embeddings": tied, "vocab_size": vocab},
              "parallel": parallel, "train": {"seq_len": SEQ, "global_batch_size": 2, "micro_batch_size": 1}}
             for tied, parallel, layers, vocab in ((False, {"tp": 2}, 4, MODEL["vocab_size"]),
                                                   (True, {"pp": 2}, 4, MODEL["vocab_size"]),
                                                   (True, {"pp": 2}, 8, 16000))]
    ranks = two_gloo_ranks(PARAMETERS_PER_RANK % json.dumps(trees), tmp_path, timeout=120)
    assert [code for code, _ in ranks] == [0, 0], ranks
    counts = [[int(line) for line in out.split()] for _, out in ranks]  # [rank][layout]
    for k, tree in enumerate(trees):
        cfg = config_from_dict(tree)
        plan = plan_memory.memory_plan(cfg, 1, 2)
        rank = 1 if plan["stage"] == "last" and cfg.parallel.pp == 2 else 0
        assert plan["params_per_gpu"] == counts[rank][k], (tree["parallel"], plan["stage"])
        if cfg.parallel.pp == 2:  # and both stages'
            assert [plan_memory.stage_memory(cfg, 1, 2, r)["params"] for r in (0, 1)] == [counts[0][k], counts[1][k]]
    assert counts[0][0] == counts[1][0]  # TP ranks hold the same number of parameters
