"""The tiny SmolLM2-shaped setup shared by the parallel-layout test and its torchrun worker, and the
single-process reference run (plain PyTorch: the model, F.cross_entropy, clip_grad_norm_, torch.optim.AdamW), and
how every torchrun worker of the tests ends (`run_worker`)."""
from __future__ import annotations

import argparse
import gc
import traceback
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanotronix.config import Config, config_from_dict
from nanotronix.distributed import shutdown_and_exit

STEPS = 5

# GQA (8 heads, 4 KV heads: TP4 splits KV heads too), tied embeddings, 8 layers so that PP4 x 2 virtual stages
# has a layer per chunk.
TINY_MODEL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 64, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "init_std": 0.05}


# Document-masked layouts (`model.document_mask_eos_id=EOS` in a layout spec) split windows at this token, which
# make_data plants at ~1 in 6 positions so that most windows hold several documents.
EOS = 3


def make_config(fields: dict | None = None) -> Config:
    """ParallelConfig fields, plus `model.NAME` and `train.NAME` keys for model and train fields."""
    fields = dict(fields or {})
    model = {k.split(".", 1)[1]: fields.pop(k) for k in list(fields) if k.startswith("model.")}
    train = {k.split(".", 1)[1]: fields.pop(k) for k in list(fields) if k.startswith("train.")}
    return config_from_dict({
        "model": {**TINY_MODEL, **model},
        "parallel": {"grad_bucket_size": 20000, **fields},  # small buckets: several per rank
        "train": {"seq_len": 16, "global_batch_size": 8, "micro_batch_size": 1, "train_steps": STEPS, "seed": 3,
                  **train},
        "optimizer": {"lr": 3e-4, "weight_decay": 0.1, "clip_grad": 1.0, "betas": [0.9, 0.95], "eps": 1e-8},
    })


def make_data(cfg: Config) -> torch.Tensor:
    """[steps, global_batch, seq_len + 1] random token ids, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    t = cfg.train
    shape = (STEPS, t.global_batch_size, t.seq_len + 1)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < 1 / 6, EOS, tokens)


# After these steps every layout scores held-out windows (nanotronix/train/validation.py); 5 windows fill no layout's
# rounds of micro-batches evenly, so padding rows are exercised, and DP ranks get blocks of different sizes.
VALIDATE_AFTER = (3, STEPS)
VALIDATION_WINDOWS = 5


def make_validation_windows(cfg: Config) -> torch.Tensor:
    """[VALIDATION_WINDOWS, seq_len + 1] held-out token ids (other draws than make_data's), EOS planted alike."""
    g = torch.Generator().manual_seed(4321)
    shape = (VALIDATION_WINDOWS, cfg.train.seq_len + 1)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < 1 / 6, EOS, tokens)


def rank_batch(cfg: Config, data: torch.Tensor, step: int, dp_rank: int, dp: int) -> torch.Tensor:
    """DP rank's contiguous share of the step's global batch as [grad_accum, micro_batch, seq_len + 1] (the
    trainer's loader contract)."""
    t = cfg.train
    per_rank = t.global_batch_size // dp
    share = data[step - 1, dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return share.reshape(per_rank // t.micro_batch_size, t.micro_batch_size, t.seq_len + 1)


def reference_run(cfg: Config, data: torch.Tensor):
    """One process: returns (losses, grad_norms, {name: weight}, {name: {exp_avg, exp_avg_sq}}, validation losses
    after the steps of VALIDATE_AFTER: the mean loss over make_validation_windows of a plain forward)."""
    from nanotronix.model import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, "sdpa")
    o = cfg.optimizer
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    losses, norms, val_losses = [], [], []
    windows = make_validation_windows(cfg)
    for step in range(1, STEPS + 1):
        batch = rank_batch(cfg, data, step, 0, 1)
        total = 0.0
        for micro in batch:
            logits = model(micro[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten())
            (loss / batch.shape[0]).backward()
            total += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / batch.shape[0])
        if step in VALIDATE_AFTER:
            with torch.no_grad():
                logits = model(windows[:, :-1])
                val_losses.append(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())
    weights = {n: p.detach().clone() for n, p in named}
    states = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for n, p in named}
    return losses, norms, weights, states, val_losses


def run_worker(body: Callable[[], None]) -> NoReturn:
    """A torchrun worker's checks, then the trainer's teardown (shutdown_and_exit dodges gloo's exit-time abort):
    exit 0, or 1 with the traceback printed when they raise."""
    code = 0
    try:
        body()
    except Exception:
        traceback.print_exc()
        code = 1
    shutdown_and_exit(code)


def parse_layout(text: str) -> tuple[str, dict]:
    """NAME:key=value,... (a layout as the tests name it) -> (NAME, its parallel fields)."""
    name, _, spec = text.partition(":")
    fields = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        fields[key] = {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)
    return name, fields


def run_layouts_main(description: str, run_layout: Callable[[str, dict, Path], None]) -> NoReturn:
    """A layout worker's command line (`--out DIR LAYOUT...`): each layout run in turn on gloo, as run_worker runs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True)
    parser.add_argument("layouts", nargs="+")
    args = parser.parse_args()
    # The imports' objects (torch's, dynamo's) are kept to the end: out of the collector's sight, its collections
    # between and within the layouts (dist_plan_memory.py's `gc.collect()`s) scan only what the layouts make, which
    # took that worker's launch from ~90 to ~60 CPU-s on 2 cores.
    gc.freeze()
    dist.init_process_group("gloo")

    def run_layouts() -> None:
        for text in args.layouts:
            name, fields = parse_layout(text)
            run_layout(name, fields, Path(args.out))
    run_worker(run_layouts)
