"""Checkpoints: topology-agnostic save/load with torch.distributed.checkpoint, atomic commit, retention,
preemption handling, and the Hugging Face export/import built on them.

    Checkpointer              what the training loop calls (resume / after_step / close)
    find_checkpoint, resolve_checkpoint   CKPT_DIR (step folder or run folder) -> step folder
    CheckpointReader          single-process, tensor-at-a-time reading (export, evaluate)
    CheckpointError           missing / incomplete / damaged / incompatible checkpoint (one line)
"""
from nanotronix.checkpoint.errors import CheckpointError
from nanotronix.checkpoint.paths import find_checkpoint, resolve_checkpoint

# Imported on first use: they pull in torch.distributed.checkpoint (~1 s), which the path helpers and the Hub
# checks of tools/convert_to_hf.py (run before any conversion) do not need.
_LAZY = {"Checkpointer": "checkpointer", "ResumeState": "checkpointer", "CheckpointReader": "reader"}

__all__ = ["CheckpointError", "find_checkpoint", "resolve_checkpoint", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
