"""Process groups for tensor, data and pipeline parallelism.

Rank order is TP fastest, then DP, then PP: rank = tp + TP * (dp + DP * pp), Megatron's default order, so a
tensor-parallel group is a run of adjacent ranks (inside one NVLink node). Tied embeddings under pipeline
parallelism need the first and last stage to sum their gradients: `embedding_group` holds those two ranks.
"""
from __future__ import annotations

import datetime

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from nanotronix.config import Config
from nanotronix.config_checks import resolve_layout
from nanotronix.distributed import joining


@dataclass
class ParallelContext:
    tp: int
    pp: int
    dp: int
    rank: int
    world_size: int
    tp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    embedding_group: Optional[dist.ProcessGroup] = None  # first + last stage of this pipeline (pp > 1)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def global_rank(self, tp: int, dp: int, pp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def pp_peer(self, pp_rank: int) -> int:
        """Global rank of the given pipeline stage in this rank's pipeline."""
        return self.global_rank(self.tp_rank, self.dp_rank, pp_rank)

    @classmethod
    def build(cls, cfg: Config) -> "ParallelContext":
        """Create every group; call after dist.init_process_group (a single process needs no groups)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        dp = resolve_layout(cfg, world)
        ctx = cls(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=dp, rank=rank, world_size=world)
        if not dist.is_initialized():
            return ctx
        with joining(cfg.parallel.collective_timeout_minutes):
            ctx._create_groups(datetime.timedelta(minutes=cfg.parallel.collective_timeout_minutes))
        return ctx

    def _create_groups(self, timeout: datetime.timedelta) -> None:
        """new_group is collective: every rank creates every group, in the same order, and keeps its own. A group
        does not inherit init_process_group's timeout (it would get torch's default): each is given it."""
        ctx, rank = self, self.rank
        g = ctx.global_rank
        for p in range(ctx.pp):
            for d in range(ctx.dp):
                group = dist.new_group([g(t, d, p) for t in range(ctx.tp)], timeout=timeout)
                if rank in [g(t, d, p) for t in range(ctx.tp)]:
                    ctx.tp_group = group
        for p in range(ctx.pp):
            for t in range(ctx.tp):
                members = [g(t, d, p) for d in range(ctx.dp)]
                group = dist.new_group(members, timeout=timeout)
                if rank in members:
                    ctx.dp_group = group
        for d in range(ctx.dp):
            for t in range(ctx.tp):
                members = [g(t, d, p) for p in range(ctx.pp)]
                group = dist.new_group(members, timeout=timeout)
                if rank in members:
                    ctx.pp_group = group
                ends = sorted({members[0], members[-1]})
                group = dist.new_group(ends, timeout=timeout)
                if rank in ends:
                    ctx.embedding_group = group
