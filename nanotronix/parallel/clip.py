"""Global gradient norm and clipping across TP x PP x DP, and the global-batch loss, in one all-reduce.

Every element of the logical (single-process) gradient must be counted exactly once over the whole world:
  - a TP-sharded parameter: each TP rank counts its shard; a TP-replicated one (norms): only TP rank 0;
  - the tied embedding under pipeline parallelism (held by the first and the last stage): only the first stage;
  - zero_stage 1: each DP rank counts its own gradient shard; zero_stage 0 (gradients replicated over DP): only
    DP rank 0.
The sum of squares and this rank's share of the loss go into one world all-reduce. Clipping then scales every
gradient this rank will apply by min(1, max_norm / (norm + 1e-6)), the rule of `torch.nn.utils.clip_grad_norm_`.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _counted_here(param, ctx, sharded: bool) -> bool:
    if param.tp_shard_dim is None and ctx.tp_rank != 0:
        return False
    if getattr(param, "tied_across_stages", False) and not ctx.is_first_stage:
        return False
    return sharded or ctx.dp_rank == 0


@torch.no_grad()
def clip_grad_norm_and_reduce_loss(optimizer, ctx, max_norm: float, local_loss: torch.Tensor) -> tuple[float, float]:
    """Return (global gradient norm before clipping, sum of `local_loss` over the world); clip in place.

    max_norm <= 0 disables clipping (the norm is still computed and returned).
    """
    pieces = optimizer.grad_pieces()
    counted = [g for g, p in pieces if _counted_here(p, ctx, optimizer.sharded)]
    sq = torch.zeros((), dtype=torch.float32, device=local_loss.device)
    if counted:
        sq = torch.stack(torch._foreach_norm(counted)).square().sum()
    stats = torch.stack([sq, local_loss.float().reshape(())])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    norm = math.sqrt(stats[0].item())
    if max_norm > 0 and pieces:
        coef = min(1.0, max_norm / (norm + 1e-6))
        torch._foreach_mul_([g for g, _ in pieces], coef)
    return norm, stats[1].item()
