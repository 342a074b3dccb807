"""AdamW with the SmolLM2 settings: decoupled weight decay on matrices, none on norm gains (1-D tensors)."""
from __future__ import annotations

from typing import Iterable

from torch import nn


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
