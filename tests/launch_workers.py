"""Stand-in workers for `python -m nanotronix.launch` (tests/test_launch.py, tests/test_launch_edge_cases.py): two
ranks, each told by its argv what to do (exit 75, fail, catch or ignore a signal), and the launches around them."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import ROOT

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

# argv[1 + RANK] says what the worker of that rank does; argv[3], for the plans that wait for a signal, is a folder
# for their `ready-RANK` files (the pid, once the handler is set).
WORKER = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
plan = sys.argv[1 + rank]
if plan == "raise":
    raise ValueError(f"rank {rank} fails")
if plan == "75":  # after the other rank has set its handlers, even on a loaded machine
    time.sleep(1.0)
    sys.exit(75)
if plan == "75-late":  # still in its teardown when the other has exited: torchrun SIGTERMs it (default action)
    time.sleep(30)
    sys.exit(75)
if plan == "slow-to-stop":  # catches torchrun's SIGTERM, takes 3 s to stop, then fails
    def stop(*_):
        time.sleep(3)
        print(f"rank {rank} stops now", flush=True)
        os._exit(1)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(30)
if plan == "killed-on-term":  # torchrun's SIGTERM (once the other exited) ends it by a SIGKILL, as the OOM killer
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGKILL))
    time.sleep(30)
if plan.startswith("term-") or plan == "int-75":  # signalled (Slurm signals every process of the step, torchrun
    stopping = []                                  # then passes it on; a terminal's Ctrl-C SIGINTs them all)
    if plan == "int-75":  # saves on SIGINT and exits 75
        signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    elif plan != "term-default":  # term-default: no handler yet (a trainer in its start-up)
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    # written whole, then named: the test reads the pid as soon as the name is there (an open() that creates it
    # empty, then a write, could be read between the two on a loaded machine)
    with open(f"{sys.argv[3]}/.ready-{rank}", "w") as f:
        f.write(str(os.getpid()))
    os.rename(f"{sys.argv[3]}/.ready-{rank}", f"{sys.argv[3]}/ready-{rank}")
    while not stopping:
        time.sleep(0.05)
    time.sleep(0.5)  # the save
    if plan in ("term-75", "int-75"):  # the trainer: saved, exit 75
        print(f"rank {rank} saved", flush=True)
        sys.exit(75)
    if plan == "term-0":  # the trainer that had just finished its last step: exit 0
        sys.exit(0)
    if plan == "term-fails":
        raise ValueError(f"rank {rank} fails")
    if plan == "term-killed":  # SIGKILLed, as torchrun ends a worker that outlives its shutdown deadline
        os.kill(os.getpid(), signal.SIGKILL)
"""


def launch_command(tmp_path: Path, plans: tuple[str, ...], launcher: str = "nanotronix.launch",
                   hold_back_s: float | None = None) -> list[str]:
    """`launcher` (nanotronix.launch or torch.distributed.run) with 2 workers following `plans`; `hold_back_s` sets
    nanotronix.launch's hold-back of the agent's log lines."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = ["--standalone", "--nproc_per_node=2", "--max_restarts=0", str(worker), *plans]
    if hold_back_s is None:
        return [sys.executable, "-m", launcher, *args]
    return [sys.executable, "-c", f"import sys, nanotronix.launch as m; m.HOLD_BACK_S = {hold_back_s}; "
                                  "sys.exit(m.main(sys.argv[1:]))", *args]


def launch(tmp_path: Path, plans: tuple[str, str], launcher: str = "nanotronix.launch",
           hold_back_s: float | None = None) -> tuple[int, str]:
    """(exit code, stdout and stderr together, in order) of `launcher` with 2 workers following `plans`."""
    proc = subprocess.run(launch_command(tmp_path, plans, launcher, hold_back_s), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    return proc.returncode, proc.stdout


def launch_and_signal(tmp_path: Path, plans: tuple[str, str], sig: signal.Signals, launcher: str = "nanotronix.launch",
                      hold_back_s: float | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `launcher` with 2 workers following `plans` (ones that write `ready-RANK`),
    sent `sig` with them once they are ready, as Slurm signals every process of a job step (scancel, the time
    limit) and a terminal's Ctrl-C every process in its foreground."""
    for ready in tmp_path.glob("ready-*"):
        ready.unlink()
    proc = subprocess.Popen(launch_command(tmp_path, (*plans, str(tmp_path)), launcher, hold_back_s), cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate(timeout=60)
            time.sleep(0.05)
        for pid in [proc.pid] + [int(ready.read_text()) for ready in tmp_path.glob("ready-*")]:
            # the launcher passes the signal on at once, so a worker without a handler may be gone already: Slurm
            # signals the processes still there (CI once lost this race)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, out, err
