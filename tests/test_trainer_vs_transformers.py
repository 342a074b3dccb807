"""The trainer against a training loop whose every part someone else wrote: transformers' `LlamaForCausalLM` (its
own random initialisation, brought in with tools/convert_from_hf.py), `torch.optim.AdamW` with the weight-decay
split of transformers' Trainer (no decay on norms), `torch.nn.utils.clip_grad_norm_` and transformers'
`get_wsd_schedule`, fed the trainer's own batches. fp32, 6 steps through warm-up, stable and decay, gradient
accumulation 2, clipping active: the trainer logs the same loss, gradient norm and learning rate at every step, and
its last checkpoint, exported with tools/convert_to_hf.py, holds the same weights as the loop's model (~10 s).

Learning-rate convention: the trainer's step s uses `get_wsd_schedule`'s factor at s. Loops that step their
scheduler after each update (transformers', nanotron's LambdaLR, Megatron's OptimizerParamScheduler) apply the factor
at s - 1 to their s-th update, so their first update has learning rate 0; ours trains at lr / warmup_steps from step
1. Where the minimum learning rate is above 0, transformers' warm-up starts from it and ours from 0 (like Megatron's
default init_lr); the decay phases agree either way (test_learning_rate_is_transformers_wsd_schedule).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import get_wsd_schedule

from checkpoint_helpers import read_metrics, train_in_process
from helpers import TINY_MODEL, load_tool, tiny_config, write_learnable_store

STEPS = 6
LR = 3e-3
SCHEDULE = {"warmup_steps": 2, "decay_start_step": 4, "decay_steps": 3, "decay_style": "linear", "min_lr": 0.0}
OPTIMIZER = {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "clip_grad": 0.5}


def _wsd(optimizer, schedule: dict, peak: float):
    """transformers' scheduler for our schedule: warm-up W, stable up to decay_start, decay over D steps."""
    return get_wsd_schedule(optimizer, num_warmup_steps=schedule["warmup_steps"],
                            num_stable_steps=schedule["decay_start_step"] - schedule["warmup_steps"],
                            num_decay_steps=schedule["decay_steps"], decay_type=schedule["decay_style"],
                            min_lr_ratio=schedule["min_lr"] / peak)


def _hf_model(folder) -> transformers.LlamaForCausalLM:
    """A tiny SmolLM2-shaped model initialised and saved by transformers itself."""
    config = transformers.LlamaConfig(**{k: v for k, v in TINY_MODEL.items() if k != "init_std"},
                                      initializer_range=TINY_MODEL["init_std"], bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    model.save_pretrained(folder)
    return model


def _reference_loop(model: transformers.LlamaForCausalLM, batches: list[torch.Tensor]):
    """Per step: (loss, grad norm before clipping, learning rate); the model is trained in place."""
    decayed = set(transformers.Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decayed], "weight_decay": OPTIMIZER["weight_decay"]},
              {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0}]
    assert groups[0]["params"] and groups[1]["params"]  # the norms are outside the decay, the matrices inside
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=tuple(OPTIMIZER["betas"]), eps=OPTIMIZER["eps"])
    factor = _wsd(optimizer, SCHEDULE, LR).lr_lambdas[0]
    model.train()
    records = []
    for step, batch in enumerate(batches, start=1):  # [accumulation, micro-batch, seq_len + 1]
        for group in optimizer.param_groups:  # our step s: the factor at s (see the module docstring)
            group["lr"] = LR * factor(step)
        total = 0.0
        for micro in batch.long():
            logits = model(input_ids=micro[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten())
            (loss / len(batch)).backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["clip_grad"]).item()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append((total / len(batch), norm, lr))
    return records


def test_trainer_follows_a_transformers_training_loop(tmp_path):
    from nanotronix.config import load_config
    from nanotronix.data.loader import build_train_loader

    hf = _hf_model(tmp_path / "hf_init")
    assert load_tool("convert_from_hf").main(["--hf", str(tmp_path / "hf_init"), "--output",
                                               str(tmp_path / "init"), "--no-progress"]) == 0
    config = tiny_config(tmp_path, write_learnable_store(tmp_path / "arith"),
                         train={"train_steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2},
                         optimizer=OPTIMIZER, lr_schedule=SCHEDULE,
                         checkpoint={"dir": str(tmp_path / "ckpt"), "resume": str(tmp_path / "init")})
    train_in_process(config)
    ours = read_metrics(tmp_path / "logs")

    loader = build_train_loader(load_config(config), dp_rank=0, dp_size=1)
    theirs = _reference_loop(hf, [loader.batch(step) for step in range(1, STEPS + 1)])

    assert sorted(ours) == list(range(1, STEPS + 1))
    for step, (loss, norm, lr) in enumerate(theirs, start=1):
        assert ours[step]["lr"] == pytest.approx(lr, rel=1e-12), step
        assert ours[step]["loss"] == pytest.approx(loss, rel=1e-5), (step, ours[step]["loss"], loss)
        assert ours[step]["grad_norm"] == pytest.approx(norm, rel=1e-4), (step, ours[step]["grad_norm"], norm)
    assert [record[2] for record in theirs][1:4] == [LR] * 3 and 0 < theirs[-1][2] < LR  # every phase ran
    assert any(norm > OPTIMIZER["clip_grad"] for _, norm, _ in theirs)  # clipping changed some update

    assert load_tool("convert_to_hf").main(["--checkpoint", str(tmp_path / "ckpt"), "--output",
                                             str(tmp_path / "hf_trained"), "--no-progress"]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf_trained", dtype=torch.float32)
    want = hf.state_dict()
    for name, got in exported.state_dict().items():
        # Adam turns summation-order noise (~1e-7 here) into differences of up to ~lr where a gradient is ~0 (its
        # m / sqrt(v)): scattered elements only. A wrong decay, clip, lr or step would move whole tensors by ~lr.
        diff = (got - want[name]).abs()
        assert diff.mean() < 2e-5, (name, diff.mean().item())
        assert (diff > 2e-4).float().mean() < 0.01, (name, int((diff > 2e-4).sum()), diff.numel())


@pytest.mark.parametrize("style", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("min_lr", [0.0, 1e-4])
def test_learning_rate_is_transformers_wsd_schedule(style, min_lr):
    from nanotronix.config import LRScheduleConfig
    from nanotronix.train.lr_schedule import lr_at

    peak = 1e-3
    schedule = {"warmup_steps": 10, "decay_start_step": 40, "decay_steps": 25, "decay_style": style,
                "min_lr": min_lr}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    factor = _wsd(optimizer, schedule, peak).lr_lambdas[0]
    ours = LRScheduleConfig(**schedule)
    first = 1 if min_lr == 0 else schedule["warmup_steps"]  # see the module docstring: warm-ups differ above 0
    for step in range(first, 80):
        assert lr_at(step, peak, ours) == pytest.approx(peak * factor(step), rel=1e-12, abs=1e-15), step
    assert math.isclose(lr_at(79, peak, ours), min_lr, abs_tol=1e-15)
