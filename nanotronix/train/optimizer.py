"""AdamW with the SmolLM2 settings: decoupled weight decay on matrices, none on norm gains (1-D tensors)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from nanotronix import accel
from nanotronix.config import OptimizerConfig


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimizerConfig,
                device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(named_params, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    apex_adam = accel.fused_adam_class()
    if apex_adam is not None and device.type == "cuda":
        return apex_adam(groups, adam_w_mode=True, **kwargs)
    # torch's fused kernel on CUDA; foreach on CPU, where it is the tested reference path.
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)
