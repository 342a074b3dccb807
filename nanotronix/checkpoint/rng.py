"""Random number generator states of one rank (torch CPU and CUDA, Python, NumPy), saved per global rank.

They are restored only into the same layout (same world size and TP/PP/DP): in another layout rank r does
different work, so its old generator state would mean nothing; the run then keeps its freshly seeded state.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank_{rank:05d}.pt"


def capture_rng() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_rng(folder: Path, rank: int, state: dict[str, Any]) -> str:
    """Write this rank's RNG file (fsynced); return its path relative to the folder."""
    import os

    path = rng_file(folder, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return path.relative_to(folder).as_posix()


def load_rng(folder: Path, rank: int) -> dict[str, Any]:
    # Python and NumPy states are tuples holding arrays: not loadable with weights_only. The file was
    # written by this code and its SHA-256 checked against the manifest before this load.
    return torch.load(rng_file(folder, rank), weights_only=False)
