"""AdamW's parameter groups: decoupled weight decay on the matrices (embedding and head included); on the norm gains
(1-D tensors) only with `optimizer.weight_decay_norms`, as SmolLM2's trainer did (nanotron of that time built one
AdamW group with `weight_decay` for every parameter; its exclusion list came later, with SmolLM3). Off by default,
as in transformers' Trainer and most recipes since."""
from __future__ import annotations

from typing import Iterable

from torch import nn


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 decay_norms: bool = False) -> list[dict]:
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 or decay_norms else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
