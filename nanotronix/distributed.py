"""Process start-up and teardown under torchrun (or as one plain process).

NCCL on CUDA and gloo on CPU, same code path. Teardown ends with `os._exit`: on gloo a process that used
DTensor collectives can abort at interpreter exit after its work is done (see the shared ENVIRONMENT notes), which
torchrun would report as a failed run.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from nanotronix.errors import UserError


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device: cuda requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_minutes: float = 10.0) -> None:
    """Join the torchrun process group; a single plain process runs without one."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=device if device.type == "cuda" else None)


def shutdown_and_exit(code: int) -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
