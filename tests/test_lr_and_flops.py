"""LR schedule pinned to the published SmolLM2-1.7B recipe, and the MFU FLOP counter against hand counts, torch's
FlopCounterMode and the published counts of Megatron-LM, nanotron and torchtitan, and the learning rate against
Megatron-Core's WSD scheduler (~8 s)."""
import math

import pytest
import torch

from nanotronix.config import LRScheduleConfig, ModelConfig, PRESETS
from nanotronix.train.flops import document_attention_span, flops_per_token, matmul_params, mfu
from nanotronix.train.lr_schedule import lr_at

# SmolLM2-1.7B (huggingface/smollm config_smollm2_1B.yaml, paper Sec. 4.1): peak 5e-4, linear warm-up 2000 steps,
# linear decay from step 4,716,000 over 524,000 steps to 0; 5,240,000 steps in all.
SMOLLM2_1P7B = LRScheduleConfig(warmup_steps=2000, decay_start_step=4_716_000, decay_steps=524_000,
                                decay_style="linear", min_lr=0.0)


def test_smollm2_1p7b_schedule():
    peak = 5e-4
    assert lr_at(1, peak, SMOLLM2_1P7B) == pytest.approx(peak / 2000)
    assert lr_at(1000, peak, SMOLLM2_1P7B) == pytest.approx(peak / 2)
    assert lr_at(2000, peak, SMOLLM2_1P7B) == peak
    assert lr_at(2001, peak, SMOLLM2_1P7B) == peak
    assert lr_at(4_716_000, peak, SMOLLM2_1P7B) == peak
    assert lr_at(4_716_000 + 262_000, peak, SMOLLM2_1P7B) == pytest.approx(peak / 2)
    assert lr_at(5_240_000, peak, SMOLLM2_1P7B) == 0.0
    # monotone non-increasing through the decay
    values = [lr_at(s, peak, SMOLLM2_1P7B) for s in range(4_716_000, 5_240_001, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("style, half", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_decay_styles_end_at_min_lr(style, half):
    s = LRScheduleConfig(warmup_steps=10, decay_start_step=100, decay_steps=100, decay_style=style, min_lr=1e-5)
    assert lr_at(200, 1e-3, s) == pytest.approx(1e-5)
    assert lr_at(300, 1e-3, s) == pytest.approx(1e-5)
    assert lr_at(150, 1e-3, s) == pytest.approx(1e-5 + (1e-3 - 1e-5) * half)


def test_warm_up_ends_at_the_peak_exactly():
    """peak * step / warmup_steps rounds to 1 ulp off the peak at the last warm-up step for these peaks (above it for
    the first); peak * (step / warmup_steps) is the peak itself (found by tests/test_train_properties.py)."""
    assert lr_at(5, 6.745791472935803, LRScheduleConfig(warmup_steps=5)) == 6.745791472935803
    assert lr_at(37, 7.745791472935803, LRScheduleConfig(warmup_steps=37)) == 7.745791472935803


def test_flops_counter_excludes_embedding_lookup_and_halves_causal_attention():
    cfg = ModelConfig(**PRESETS["smollm2-1.7b"])
    n_nonembed = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size - cfg.num_hidden_layers * 2 * 2048 - 2048
    # matmul params = non-embedding matrices + the output head GEMM (tied, but a real matmul)
    assert matmul_params(cfg) == n_nonembed + cfg.vocab_size * cfg.hidden_size
    s = 2048
    full_attention = 12 * cfg.num_hidden_layers * s * cfg.hidden_size  # PaLM appendix B, non-causal
    assert flops_per_token(cfg, s) == pytest.approx(6 * matmul_params(cfg) + full_attention / 2)
    assert mfu(1000.0, 1e12, None) is None
    assert mfu(1000.0, 1e12, 1000.0) == pytest.approx(1.0)


def _megatron_lm_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Megatron-LM's current `num_floating_point_operations` (megatron/training/training.py: dense, SwiGLU, GQA, the
    attention matrix halved for the causal mask) per token:
    12 L D^2 [(1 + G/H + S/2D) H hd/D + 1.5 F/D + V/2LD]."""
    layers, d, heads, groups = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    query = heads * cfg.head_dim / d
    return 12 * layers * d * d * ((1 + groups / heads + seq_len / d / 2) * query + 1.5 * cfg.intermediate_size / d
                                  + cfg.vocab_size / (2 * layers * d))


def _nanotron_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """nanotron's `get_flops` (src/nanotron/models/llama.py, SmolLM2's trainer) per token: 3 x the forward's matmuls,
    the scores and weighted values over the whole S x S matrix (no causal halving), and the head."""
    d, f, s, heads, hd = cfg.hidden_size, cfg.intermediate_size, seq_len, cfg.num_attention_heads, cfg.head_dim
    qkv = 2 * d * heads * hd + 2 * d * 2 * cfg.num_key_value_heads * hd
    layer = qkv + 2 * heads * hd * s + 2 * heads * s * hd + 2 * heads * hd * d + 4 * d * f + 2 * f * d
    return 3 * (cfg.num_hidden_layers * layer + 2 * d * cfg.vocab_size)


def _torchtitan_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """torchtitan's `get_num_flop_per_token`: 6 x the parameters but the embedding, plus 12·l·h·q·t."""
    return 6 * (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size) + \
        12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def test_flops_are_megatron_lms_count_and_the_readme_comparison_holds():
    """The MFU's FLOP count is Megatron-LM's current one for every preset (GQA included), and the README's comparison
    (Performance) holds: 1.7B at seq 2048 is 10.87 GFLOP/token here and by torchtitan's count, 11.48 by nanotron's
    and PaLM-style full-attention counts, which would read the 46.3% run (42,116 tokens/s/GPU) as 48.8%."""
    for preset in ("smollm2-135m", "smollm2-360m", "smollm2-1.7b"):
        cfg = ModelConfig(**PRESETS[preset])
        for seq_len in (2048, 8192):
            assert flops_per_token(cfg, seq_len) == pytest.approx(_megatron_lm_flops_per_token(cfg, seq_len),
                                                                  rel=1e-12), (preset, seq_len)
    cfg = ModelConfig(**PRESETS["smollm2-1.7b"])
    ours, nanotron = flops_per_token(cfg, 2048), _nanotron_flops_per_token(cfg, 2048)
    assert (round(ours / 1e9, 2), round(_torchtitan_flops_per_token(cfg, 2048) / 1e9, 2)) == (10.87, 10.87)
    assert round(nanotron / 1e9, 2) == 11.48
    assert nanotron == pytest.approx(ours + 6 * cfg.num_hidden_layers * 2048 * cfg.hidden_size)  # the other half
    # the measured run: 42,116 tokens/s on one H100 SXM (989.4 TFLOP/s bf16)
    assert (round(100 * mfu(42_116, ours, 989.4), 1), round(100 * mfu(42_116, nanotron, 989.4), 1)) == (46.3, 48.8)


def test_document_masking_counts_only_the_attention_inside_documents():
    """Windows of 8 tokens, EOS = 1: documents [3, 5] and [8] attend 3^2 + 5^2 and 8^2 (halved by causality)
    pairs, not 2 x 8^2."""
    tokens = torch.tensor([[5, 6, 1, 7, 7, 7, 7, 1], [4, 4, 4, 4, 4, 4, 4, 4]])
    span = document_attention_span(tokens, eos_id=1)
    assert span == pytest.approx((3 ** 2 + 5 ** 2 + 8 ** 2) / (2 * 8))
    assert document_attention_span(tokens[1:], eos_id=1) == 8  # no EOS: the whole window, as without masking
    assert document_attention_span(tokens.reshape(1, 2, 8), eos_id=1) == span  # [accum, micro, S] batches
    cfg = ModelConfig(**PRESETS["smollm2-135m"])
    attention = flops_per_token(cfg, 8) - 6 * matmul_params(cfg)
    assert flops_per_token(cfg, 8, span) - 6 * matmul_params(cfg) == pytest.approx(attention * span / 8)


def test_flops_counter_agrees_with_torch_flop_counter():
    """torch's FlopCounterMode counts every matmul of a forward and backward (the embedding lookup is none):
    6 x matmul_params per token exactly; the materialised attention of the eager backend computes the full S x S
    scores, twice the causal attention the MFU counts."""
    from torch.utils.flop_counter import FlopCounterMode
    from nanotronix.model import build_model

    cfg = ModelConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, init_std=0.02)
    batch, seq = 3, 40
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    counted = {}
    for backend in ("sdpa", "eager"):  # CPU SDPA is not counted by FlopCounterMode: only the matmuls are
        model = build_model(cfg, backend)
        with FlopCounterMode(display=False) as counter:
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        counted[backend] = counter.get_total_flops()
    assert counted["sdpa"] == 6 * matmul_params(cfg) * batch * seq
    causal_attention = (flops_per_token(cfg, seq) - 6 * matmul_params(cfg)) * batch * seq
    assert counted["eager"] - counted["sdpa"] == pytest.approx(2 * causal_attention, rel=1e-12)


def test_fp32_mfu_is_against_the_peak_of_the_math_that_runs():
    """fp32 training's matmuls run in full FP32 (TF32 off, torch's default, and the trainer does not turn it on), so
    its MFU is against the plain FP32 peak, a fraction of the tensor cores' (the TF32 peak made fp32 MFU read ~7x
    too low). If TF32 is ever switched on, this fails and the peaks must follow."""
    import importlib

    from nanotronix.train.gpus import GPUS

    importlib.import_module("nanotronix.train.trainer")  # everything the trainer imports, in case one set it

    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    for device, sheet in GPUS.items():  # FP32 without tensor cores: ~1/15 of bf16
        assert sheet.peak_tflops["float32"] < sheet.peak_tflops["bfloat16"] / 10, device


def test_each_board_gets_its_own_peak():
    """The names CUDA reports for the boards map to their data sheets' rows: an H200 NVL (a PCIe card at a lower
    clock, 1,671 sparse bf16 TFLOP/s) had the H200 SXM's peak, so its MFU read ~16% low."""
    from nanotronix.train.gpus import GPUS, gpu_of_device_name
    names = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200", "NVIDIA H200 NVL": "H200 NVL", "NVIDIA A100-SXM4-80GB": "A100",
             "NVIDIA GeForce RTX 4090": None}
    assert {name: gpu_of_device_name(name) for name in names} == names
    assert GPUS["H200 NVL"].peak_tflops["bfloat16"] == pytest.approx(1671 / 2, rel=1e-3)
    assert GPUS["H200 NVL"].node_link == "PCIe"  # its bridges join 4 cards, not the node's 8


# Megatron-Core's scheduler in a process of its own (importing megatron.core sets environment variables and warning
# filters): its learning rate after `num_steps` updates, for each schedule given.
MEGATRON_LR = """
import json, sys, warnings
warnings.simplefilter("ignore")
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
out = []
for s in json.loads(sys.argv[1]):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s["peak"])
    sched = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=s["peak"], min_lr=s["min_lr"],
                                    lr_warmup_steps=s["warmup_steps"],
                                    lr_decay_steps=s["decay_start_step"] + s["decay_steps"], lr_decay_style="WSD",
                                    start_wd=0.0, end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant",
                                    wsd_decay_steps=s["decay_steps"], lr_wsd_decay_style=s["megatron_style"])
    lrs = []
    for _ in range(s["steps"]):
        sched.step(1)
        lrs.append(sched.get_lr(optimizer.param_groups[0]))
    out.append(lrs)
print(json.dumps(out))
"""


def test_learning_rate_is_megatron_wsd_schedule():
    """Megatron-Core's WSD schedule (init_lr 0, warm-up, stable, decay to min_lr over wsd_decay_steps) after s updates
    is ours at step s, warm-up included, for each decay style (Megatron's minus_sqrt is our 1-sqrt)."""
    import json
    import subprocess
    import sys

    schedules = [dict(peak=1e-3, min_lr=min_lr, warmup_steps=10, decay_start_step=40, decay_steps=25, steps=80,
                      style=style, megatron_style=megatron_style)
                 for style, megatron_style in (("linear", "linear"), ("cosine", "cosine"), ("1-sqrt", "minus_sqrt"))
                 for min_lr in (0.0, 1e-4)]
    proc = subprocess.run([sys.executable, "-c", MEGATRON_LR, json.dumps(schedules)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for s, theirs in zip(schedules, json.loads(proc.stdout.strip().splitlines()[-1])):
        ours = LRScheduleConfig(warmup_steps=s["warmup_steps"], decay_start_step=s["decay_start_step"],
                                decay_steps=s["decay_steps"], decay_style=s["style"], min_lr=s["min_lr"])
        for step, lr in enumerate(theirs, start=1):
            assert lr_at(step, s["peak"], ours) == pytest.approx(lr, rel=1e-12, abs=1e-15), (s["style"], step)


def test_a_run_that_ends_before_its_schedule_gets_a_note():
    """A short run that kept a long run's schedule (the README's `train.train_steps=20` on the quickstart config)
    says so at start; a run whose schedule fits says nothing."""
    from nanotronix.train.lr_schedule import schedule_note

    sched = LRScheduleConfig(warmup_steps=30, decay_start_step=240, decay_steps=60)
    assert "warmup_steps=30 is beyond train.train_steps=20" in schedule_note(sched, 20)
    assert "decays until step 300, after train.train_steps=100" in schedule_note(sched, 100)
    assert schedule_note(sched, 300) is None and schedule_note(LRScheduleConfig(warmup_steps=2), 5) is None
    # a run continued past a decay to 0: its last steps would change nothing
    assert "decays to 0 at step 300: steps 301-350 (train.train_steps) train at learning rate 0" in \
        schedule_note(sched, 350)
    assert schedule_note(LRScheduleConfig(warmup_steps=30, decay_start_step=240, decay_steps=60, min_lr=1e-5),
                         350) is None
