"""SIGTERM / SIGUSR1 -> "stop after this step": the preemption notice of Slurm, torchrun and cluster schedulers.

The handler only sets a flag (nothing else is safe inside a signal handler). After each step every rank asks
`stop_requested()`, which takes the maximum of the flag over all ranks: a signal that reached only some ranks
(Slurm's `--signal` to one task, a user's `kill`) still stops all of them at the same step, so they all save
that step and exit together.

A worker that torchrun started also stops so when torchrun is gone (its parent changed: killed, or dead of a
SIGUSR1 meant for its workers): nothing would collect its exit, pass on a signal or stop it at the end of its time,
and it would train on alone, holding the run's lock, until the run's last step.
"""
from __future__ import annotations

import functools
import os
import signal
from typing import Optional

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_GONE = 255  # not a signal number: what a rank whose launcher died puts in the ranks' agreement


@functools.cache
def torchrun_pid() -> Optional[int]:
    """The torchrun (torch elastic agent) that started this process, its parent, or None when it was not started
    by one (the agent gives its workers TORCHELASTIC_RUN_ID). Fixed at the first call, which the trainer's main
    makes first thing: a torchrun that dies during the start-up (model build, data checks: minutes at scale) has
    left its workers to init (pid 1) or a subreaper by the time the Checkpointer asks."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None


class PreemptionWatcher:
    def __init__(self, device: torch.device, launcher_pid: Optional[int] = None):
        self.device = device
        self.launcher_pid = launcher_pid  # this process's parent while its launcher lives (`torchrun_pid`)
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
        if self.received is None and self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            self.received = LAUNCHER_GONE  # reparented: the launcher died
        agreed = self.received or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([agreed], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            agreed = int(t.item())
        if agreed:
            self.stop_signal = agreed
        return bool(agreed)

    def reason(self) -> str:
        """What stopped the run, as the trainer says it."""
        if self.stop_signal == LAUNCHER_GONE:
            return "torchrun, the launcher of a rank, is gone"
        return f"received {signal.Signals(self.stop_signal).name if self.stop_signal else 'a preemption signal'}"
