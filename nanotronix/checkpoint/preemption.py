"""SIGTERM / SIGUSR1 -> "stop after this step": the preemption notice of Slurm, torchrun and cluster schedulers.

The handler only sets a flag (nothing else is safe inside a signal handler). After each step every rank asks
`stop_requested()`, which takes the maximum of the flag over all ranks: a signal that reached only some ranks
(Slurm's `--signal` to one task, a user's `kill`) still stops all of them at the same step, so they all save
that step and exit together.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: Optional[int] = None  # the signal number, once one arrived at this rank
        self.stop_signal: Optional[int] = None  # the signal all ranks agreed to stop for
        self._previous = {}

    def install(self) -> None:
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def stop_requested(self) -> bool:
        """Collective when distributed: every rank must call it after every step, and all get the same answer
        (a signal landing on one rank just after the reduction counts at the next step, on every rank). Ranks
        that got no signal adopt the number of one that did, so every rank can say what stopped the run."""
        agreed = self.received or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([agreed], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            agreed = int(t.item())
        if agreed:
            self.stop_signal = agreed
        return bool(agreed)

    def signal_name(self) -> str:
        return signal.Signals(self.stop_signal).name if self.stop_signal else "a preemption signal"
