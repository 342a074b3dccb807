"""Say which rank a stuck run waits for, and where it is, minutes before the collective timeout ends the job.

A hung multi-node run otherwise says nothing useful: every rank waits in the same all-reduce until the collective
timeout kills the job (NCCL: "ran for 600000 milliseconds before timing out"), naming no culprit. The cause is
usually one rank doing something else: reading a batch from a stalled filesystem, writing its checkpoint shard, a
dead node, a process stopped by the kernel or a debugger. NCCL's flight recorder (the Slurm scripts turn it on)
lists the collectives each rank issued, not what the rank that never issued one is doing, and it does nothing on
gloo or in a single process; hence this module.

    watch = HangWatch.start(cfg.logging.hang_report_seconds)   # after the process group exists
    watch.at(step, "data")                                     # a tuple assignment: nothing on the hot path
    ...
    watch.close()

Each rank's trainer says where it is (`at(step, phase)`). A daemon thread publishes that every `poll` seconds to
the job's c10d store (the one torchrun's rendezvous made, so nothing new to reach) under
`nanotronix/heartbeat/<rank>`. When rank 0 has not moved for `after` seconds it reads every rank's heartbeat once
and prints one report:
  - ranks *behind*: at an earlier step, or at an earlier phase of the same step; the others wait for them;
  - ranks *not responding*: no heartbeat for 3 polls (the process is dead, stopped, or holds the GIL), with the
    last position they published (from up to one poll before they stopped: with fast steps, a few steps back);
  - otherwise every rank is at the same point and alive: a long phase (the first compiled step), or a collective
    that all of them wait in.
Rank 0 then posts the ranks behind under `nanotronix/hang/behind`; each of them, stuck itself, prints the Python
stack of each of its threads (the training loop and the data prefetcher), which says where it is. When rank 0
moves again it says after how long. Nothing is ended here: the collective timeout still decides, and a Slurm
job's requeue and resume work as before. A single process (no store) prints its own stacks after `after` seconds.

Clocks: a rank's "for N s" and "N s ago" compare wall clocks of different hosts (NTP keeps them within
milliseconds on a cluster); what counts as not responding (3 polls, 30 s by default) is far above that.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Optional

import torch.distributed as dist

# Where a rank can be, in the order a step passes through them: a rank at an earlier phase of the same step is
# behind the others.
PHASES = ("start", "resume", "data", "skipped", "train step", "validation", "checkpoint", "finish")
HEARTBEAT_KEY = "nanotronix/heartbeat/{}"
BEHIND_KEY = "nanotronix/hang/behind"
LISTED = 8  # ranks named one by one in a report; the rest are counted


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _where(beat: dict) -> str:
    return f"step {beat['step']} ({beat['phase']})"


def _who(rank: int, beat: dict) -> str:
    return f"rank {rank} ({beat['host']}, pid {beat['pid']})"


def _position(beat: dict) -> tuple[int, int]:
    return beat["step"], PHASES.index(beat["phase"])


def thread_stacks(skip: Optional[int] = None) -> str:
    """The Python stack of every thread of this process but `skip` (an ident), each under its thread's name."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        if ident != skip:
            stack = "".join(traceback.format_stack(frame))
            parts.append(f'  thread "{names.get(ident, ident)}":\n' + stack)
    return "".join(parts)


class HangWatch:
    """One per process. `after` <= 0: a watch that does nothing."""

    def __init__(self, after: float, store=None, rank: int = 0, world_size: int = 1):
        self.after = after
        self.poll = max(0.2, min(10.0, after / 5))
        self.store, self.rank, self.world_size = store, rank, world_size
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._where = (0, "start", time.time())  # step, phase, wall time it began (set by the training loop only)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if after > 0:
            self._thread = threading.Thread(target=self._run, name="hang-watch", daemon=True)
            self._thread.start()

    @classmethod
    def start(cls, after: float) -> "HangWatch":
        """The watch of this process: on the job's c10d store under torchrun, local in a plain process."""
        if after <= 0 or not dist.is_initialized():
            return cls(after)
        store = dist.distributed_c10d._get_default_store()
        # A connection of its own where the store offers one, so the thread never queues behind the main thread's,
        # with a short timeout of its own: closing the watch never waits long on a store that went away.
        if hasattr(store, "clone"):
            store = store.clone()
            store.set_timeout(datetime.timedelta(seconds=30))
        return cls(after, store, dist.get_rank(), dist.get_world_size())

    def at(self, step: Optional[int], phase: str) -> None:
        """This rank is now at `phase` of `step` (None: the step it was at)."""
        step = self._where[0] if step is None else step
        if (step, phase) != self._where[:2]:
            self._where = (step, phase, time.time())

    @property
    def where(self) -> str:
        """Where this rank is, in words: "in step 3 (train step)", or "at start-up (resume)" before the first step."""
        step, phase, _ = self._where
        return f"in step {step} ({phase})" if step else f"at start-up ({phase})"

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # ---- the watching thread ---------------------------------------------------------------------------------

    def _beat(self) -> dict:
        step, phase, since = self._where
        return {"step": step, "phase": phase, "since": since, "sent": time.time(), "host": self.host,
                "pid": self.pid}

    def _run(self) -> None:
        reported = dumped = False  # this stuck episode: rank 0 reported it / this rank printed its stacks
        stuck_since = 0.0  # when the phase that got stuck began (set with `reported`)
        while True:
            closing = self._stop.wait(self.poll)  # one last look when closing: a report gets its "moving again"
            try:
                beat = self._beat()
                if self.store is not None:
                    self.store.set(HEARTBEAT_KEY.format(self.rank), json.dumps(beat))
                stuck_for = beat["sent"] - beat["since"]
                if stuck_for < self.after:
                    if reported:
                        _say(f"hang report: rank {self.rank} moving again, now at {_where(beat)}, after "
                             f"{beat['sent'] - stuck_since:.0f} s")
                        if self.store is not None:
                            self.store.set(BEHIND_KEY, "[]")
                    reported = dumped = False
                elif closing:  # stuck, but the run is ending: nothing to report
                    pass
                elif self.store is None:  # a single process: its own stacks
                    if not reported:
                        _say(f"hang report: no progress for {stuck_for:.0f} s in {_where(beat)}; where this process "
                             f"is:\n{thread_stacks(skip=threading.get_ident())}")
                        stuck_since, reported = beat["since"], True
                else:
                    if self.rank == 0 and not reported:
                        self.store.set(BEHIND_KEY, json.dumps(self._report(beat)))
                        stuck_since, reported = beat["since"], True
                    if not dumped and self.rank in self._listed_behind():
                        _say(f"hang report: rank {self.rank} ({self.host}, pid {self.pid}) is behind the others, in "
                             f"{_where(beat)} for {stuck_for:.0f} s; where it is:\n"
                             f"{thread_stacks(skip=threading.get_ident())}")
                        dumped = True
                if closing:
                    return
            except Exception as e:  # the store gone (the job ending) or any other failure: the run is unaffected
                if not self._stop.is_set():
                    _say(f"hang report: rank {self.rank} stopped watching ({type(e).__name__}: {e})")
                return

    def _listed_behind(self) -> list[int]:
        return json.loads(self.store.get(BEHIND_KEY)) if self.store.check([BEHIND_KEY]) else []

    def _heartbeats(self) -> dict[int, Optional[dict]]:
        keys = [HEARTBEAT_KEY.format(r) for r in range(self.world_size)]
        if self.store.check(keys):
            return {r: json.loads(v) for r, v in enumerate(self.store.multi_get(keys))}
        # A rank that never published (it died before its first poll): ask key by key, never blocking on a get.
        return {r: json.loads(self.store.get(k)) if self.store.check([k]) else None for r, k in enumerate(keys)}

    def _report(self, own: dict) -> list[int]:
        """Print what every rank is doing; return the ranks behind (they print their own stacks)."""
        now = time.time()
        beats = self._heartbeats()
        silent = {r: b for r, b in beats.items() if b is None or now - b["sent"] > 3 * self.poll}
        alive = {r: b for r, b in beats.items() if r not in silent}
        front = max(_position(b) for b in alive.values())
        behind = sorted(r for r, b in alive.items() if _position(b) < front)
        lines = [f"hang report: rank 0 has waited {now - own['since']:.0f} s in {_where(own)}; "
                 f"of {self.world_size} ranks:"]
        for r in behind[:LISTED]:
            b = alive[r]
            lines.append(f"  behind: {_who(r, b)} in {_where(b)} for {now - b['since']:.0f} s "
                         "(its stacks follow in its log)")
        for r in sorted(silent)[:LISTED]:
            b = silent[r]
            lines.append(f"  not responding: rank {r}, never heard from" if b is None else
                         f"  not responding for {now - b['sent']:.0f} s: {_who(r, b)}, last heartbeat from {_where(b)} "
                         "(dead, stopped, or holding the GIL)")
        hidden = max(0, len(behind) - LISTED) + max(0, len(silent) - LISTED)
        if hidden:
            lines.append(f"  ... and {hidden} more ranks behind or not responding")
        rest = Counter(_where(b) for r, b in alive.items() if r not in behind)
        if behind or silent:
            lines += [f"  {n} rank(s) in {where}" for where, n in rest.most_common()]
        else:
            lines.append(f"  all {self.world_size} ranks are in {_where(own)} and responding: a long phase (the first "
                         "compiled step, a large validation) or a collective every rank waits in")
        lines.append("  (nothing is stopped here: the collective timeout ends the run if it stays stuck)")
        _say("\n".join(lines))
        return behind
