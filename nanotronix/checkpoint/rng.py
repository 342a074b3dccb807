"""Random number generator states of one rank (torch CPU and CUDA, Python, NumPy), saved per global rank.

The CUDA state is that of the rank's own GPU only (torch.cuda's current device, LOCAL_RANK's): every GPU of the
node is visible to each rank, and the states of all of them would not fit a resume on nodes with fewer GPUs.

They are restored only into the same layout (same world size and TP/PP/DP): in another layout rank r does
different work, so its old generator state would mean nothing; the run then keeps its freshly seeded state.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanotronix.data.files import fsync_path


def rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank_{rank:05d}.pt"


def capture_rng() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        # None where CUDA was never used (a CPU run on a GPU machine): nothing to restore, nothing to initialise
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints before 2026-12-03 held every visible GPU's state
        own = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[own] if own < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_rng(folder: Path, rank: int, state: dict[str, Any]) -> str:
    """Write this rank's RNG file, durably (the file, and its name in the rng folder: the step commit fsyncs only the
    step folder, so after a power loss a committed step could lack the file); return its path relative to the
    folder."""
    path = rng_file(folder, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(path.parent)
    return path.relative_to(folder).as_posix()


def load_rng(folder: Path, rank: int) -> dict[str, Any]:
    # Python and NumPy states are tuples holding arrays: not loadable with weights_only. The file was
    # written by this code and its SHA-256 checked against the manifest before this load.
    return torch.load(rng_file(folder, rank), weights_only=False)
