"""Building blocks of the checkpoint tests: a tiny plain model, a few deterministic AdamW steps, and a layout
harness that cuts the plain model into one rank's TP x PP piece the way `nanotronix.parallel` does (contiguous
equal TP chunks along `tp_shard_dim`, a stage keeping only its layers, tied embedding on both pipeline ends)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os

import torch
from torch import nn

from nanotronix.config import ModelConfig
from nanotronix.model import build_model, cross_entropy

TINY = ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, rope_theta=10000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=True, init_std=0.05)
TINY_UNTIED = dataclasses.replace(TINY, tie_word_embeddings=False)

# Megatron's split: column-parallel rows (QKV, gate/up, vocab) and row-parallel columns (o, down).
TP_DIM = {"self_attn.qkv_proj.weight": 0, "mlp.gate_up_proj.weight": 0, "self_attn.o_proj.weight": 1,
          "mlp.down_proj.weight": 1, "embed_tokens.weight": 0, "lm_head.weight": 0}


def plain_model(cfg: ModelConfig = TINY, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg)


def adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_steps(model: nn.Module, optimizer, steps: range, cfg: ModelConfig = TINY) -> list[float]:
    """Steps whose batches depend only on the step number; the losses, as Python floats."""
    losses = []
    for s in steps:
        g = torch.Generator().manual_seed(1000 + s)
        ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
        loss = cross_entropy(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def reference_moments(model: nn.Module, seed: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: {"exp_avg": torch.randn(p.shape, generator=g), "exp_avg_sq": torch.rand(p.shape, generator=g)}
            for name, p in model.named_parameters()}


def tp_dim(name: str):
    for suffix, dim in TP_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def local_slice(full: torch.Tensor, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    dim = tp_dim(name)
    return full if dim is None or tp == 1 else full.chunk(tp, dim)[tp_rank]


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> list[int]:
    per = num_layers // pp
    return list(range(pp_rank * per, (pp_rank + 1) * per))


def rank_piece(plain: nn.Module, cfg: ModelConfig, tp: int, pp: int, tp_rank: int, pp_rank: int) -> nn.Module:
    """This rank's part of `plain`: its stage's modules, each weight cut to its TP chunk and tagged."""
    m = copy.deepcopy(plain)
    keep = {str(i) for i in stage_layers(cfg.num_hidden_layers, pp, pp_rank)}
    m.layers = nn.ModuleDict({k: v for k, v in m.layers.items() if k in keep})
    first, last = pp_rank == 0, pp_rank == pp - 1
    if not first and not (last and cfg.tie_word_embeddings):
        m.embed_tokens = None
    if not last:
        m.norm = m.lm_head = None
    for module_name, module in list(m.named_modules()):
        for pname, p in list(module.named_parameters(recurse=False)):
            full_name = f"{module_name}.{pname}" if module_name else pname
            local = nn.Parameter(local_slice(p.detach(), full_name, tp, tp_rank).clone())
            local.tp_shard_dim = tp_dim(full_name) if tp > 1 else None
            setattr(module, pname, local)
    if cfg.tie_word_embeddings and m.lm_head is not None and m.embed_tokens is not None:
        m.lm_head.weight = m.embed_tokens.weight
    return m


class FakeOptimizer:
    """The optimizer side of the checkpoint contract (what nanotronix.parallel.DistributedOptimizer offers)."""

    def __init__(self, model: nn.Module, states: dict[str, dict[str, torch.Tensor]], step_count: int):
        self.names = [name for name, _ in model.named_parameters()]
        self.states = {n: states[n] for n in self.names}
        self.step_count = step_count

    def param_states(self, names=None):
        return {n: s for n, s in self.states.items() if names is None or n in names}

    def load_groups(self):
        """A group per decoder layer and one per other module: pipeline stages have different numbers of groups."""
        groups: dict[str, list[str]] = {}
        for n in self.names:
            groups.setdefault(".".join(n.split(".")[:2 if n.startswith("layers.") else 1]), []).append(n)
        return list(groups.values())

    def load_param_states(self, states, step_count):
        unknown = [n for n in states if n not in self.states]
        assert not unknown, unknown
        self.states.update({n: {k: v.clone() for k, v in s.items()} for n, s in states.items()})
        self.step_count = step_count


@contextlib.contextmanager
def renames_killed_after(moves: int):
    """os.rename raises KeyboardInterrupt (as a SIGINT would) once `moves` renames have gone through: a rollback or
    save killed part-way. The real os.rename is back when the block ends."""
    real_rename, done = os.rename, []

    def killed_part_way(src, dst):
        if len(done) == moves:
            raise KeyboardInterrupt("killed mid-rollback")
        done.append(src)
        return real_rename(src, dst)

    os.rename = killed_part_way
    try:
        yield
    finally:
        os.rename = real_rename


def save_single(run_dir, step: int, model: nn.Module, optimizer, keep_last: int = 0, config: dict | None = None,
                keep_every: int = 0, keep_steps: tuple = ()):
    """Save a single-process checkpoint of a plain model (what the trainer saves with tp = pp = dp = 1), then prune
    as the trainer's checkpoint.keep_last / keep_every / keep_steps say."""
    from nanotronix.checkpoint.paths import Retention
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import take_snapshot, write_snapshot
    from nanotronix.parallel import ParallelContext

    cfg_model = model.config
    config = {"model": dataclasses.asdict(cfg_model), **(config or {})}
    snap = take_snapshot(step, model, optimizer, ParallelContext(tp=1, pp=1, dp=1, rank=0, world_size=1), config,
                         {"consumed_samples": 2 * step}, staging=None, coll=Collective())
    return write_snapshot(snap, run_dir, Collective(), Retention(keep_last, keep_every, frozenset(keep_steps)))


def load_single(folder, model: nn.Module, optimizer):
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import load_training_state
    from nanotronix.parallel import ParallelContext

    return load_training_state(folder, model, optimizer, ParallelContext(tp=1, pp=1, dp=1, rank=0, world_size=1),
                               Collective(), tied=model.config.tie_word_embeddings)


def train_in_process(config_path, *overrides: str) -> dict:
    """`python -m nanotronix.train --config ... overrides` inside this process (a single rank, or this rank of an
    already initialised process group): the trainer's own code path without paying for a new interpreter."""
    from nanotronix.config import load_config
    from nanotronix.parallel import ParallelContext
    from nanotronix.train.trainer import train

    cfg = load_config(config_path, list(overrides))
    return train(cfg, ParallelContext.build(cfg), torch.device("cpu"))


def read_metrics(log_dir) -> dict[int, dict]:
    """metrics.jsonl per step; the LAST record of a step wins (a restarted run rewrites the steps after its
    checkpoint)."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}
