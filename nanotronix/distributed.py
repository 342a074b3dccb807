"""Process start-up and teardown under torchrun (or as one plain process).

NCCL on CUDA and gloo on CPU, same code path. Teardown ends with `os._exit`: on gloo a process that used
DTensor collectives can abort at interpreter exit after its work is done (see the shared ENVIRONMENT notes), which
torchrun would report as a failed run.

When one rank stops on an error, the others fail in their next collective: `peer_stopped` tells that failure
from a bug of their own, so that they say it in one line each instead of a traceback that hides the one error
that matters (the first rank's).
"""
from __future__ import annotations

import datetime
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist

from nanotronix.errors import UserError, found_behind


def pick_device(requested: str, option: str = "train.device") -> torch.device:
    """cuda (this process's LOCAL_RANK GPU) or cpu for `requested` (auto: cuda if there is one); `option` names
    where it was asked for, in the error when CUDA is missing."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"{option}: cuda requested but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_minutes: float = 10.0) -> None:
    """Join the torchrun process group; a single plain process runs without one."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    except RuntimeError as e:  # the ranks did not all arrive in time (torch's store, or gloo's connection mesh):
        if not isinstance(e, dist.DistStoreError) and "timed out" not in str(e) and "timeout" not in str(e):
            raise  # a traceback on each rank before
        why = " ".join(str(e).split())
        raise UserError(f"the ranks did not all join within parallel.collective_timeout_minutes={timeout_minutes:g} "
                        f"({why}): a node that started late, or a rank that failed first") from None


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
    """This process's rank; before the process group exists (a bad config is found first), torchrun's RANK."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


class PeerStopped(Exception):
    """This rank stops because another one did: said in one line, exit 1 (the other rank's error is the cause)."""


# How a collective reports a peer that is gone: gloo's TCP transport ("Connection closed by peer ... This is
# typically caused by a remote worker crashing", or the socket's own errno text), NCCL's aborted communicator.
PEER_GONE_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote worker crashing",
                   "communicator was aborted")


def peer_stopped(error: BaseException) -> Optional[str]:
    """If `error` (or one behind it) is a collective failing because another rank has stopped, its message's first
    sentence; else None. Network and store errors count too: the store lives in rank 0's agent."""
    gone = found_behind(error, lambda e: isinstance(e, (dist.DistNetworkError, dist.DistStoreError)) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in PEER_GONE_WORDS)))
    if gone is None:
        return None
    said = str(gone)
    said = said.split("] ", 1)[-1] if said.startswith("[") else said  # gloo's [file.cc:line] prefix
    return " ".join(said.split(". ")[0].split())
