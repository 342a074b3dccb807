"""`python -m nanotronix.launch` (torchrun for slurm/common.sh) on 2 stand-in workers, each told what to do: a
planned stop (every worker exits 75, or is SIGTERMed by torchrun in its teardown) is one line and exit 75; a failure
is torchrun's own report, the same lines as plain torchrun's (~4 s a launch). Likewise when the launcher itself is
SIGTERMed (scancel, a time limit) with its workers: one line when they stopped as a trainer does, torchrun's
traceback when one failed."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from nanotronix.train import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]

# argv[1 + RANK] says what the worker of that rank does.
WORKER = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
plan = sys.argv[1 + rank]
if plan == "raise":
    raise ValueError(f"rank {rank} fails")
if plan == "75":
    time.sleep(0.5)
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
if plan.startswith("term-"):  # SIGTERMed (Slurm signals every process of the step, torchrun then passes it on)
    stopping = []
    if plan != "term-default":  # term-default: no handler yet (a trainer in its start-up)
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    # written whole, then named: the test reads the pid as soon as the name is there (an open() that creates it
    # empty, then a write, could be read between the two on a loaded machine)
    with open(f"{sys.argv[3]}/.ready-{rank}", "w") as f:
        f.write(str(os.getpid()))
    os.rename(f"{sys.argv[3]}/.ready-{rank}", f"{sys.argv[3]}/ready-{rank}")
    while not stopping:
        time.sleep(0.05)
    time.sleep(0.5)  # the save
    if plan == "term-75":  # the trainer: saved, exit 75
        print(f"rank {rank} saved", flush=True)
        sys.exit(75)
    if plan == "term-fails":
        raise ValueError(f"rank {rank} fails")
    if plan == "term-killed":  # SIGKILLed, as torchrun ends a worker that outlives its shutdown deadline
        os.kill(os.getpid(), signal.SIGKILL)
"""


def launch(tmp_path: Path, plans: tuple[str, str], launcher: str = "nanotronix.launch",
           hold_back_s: float | None = None) -> tuple[int, str]:
    """(exit code, stdout and stderr together, in order) of `launcher` with 2 workers following `plans`."""
    proc = subprocess.run(launch_command(tmp_path, plans, launcher, hold_back_s), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    return proc.returncode, proc.stdout


ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def launch_command(tmp_path: Path, plans: tuple[str, ...], launcher: str, hold_back_s: float | None) -> list[str]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = ["--standalone", "--nproc_per_node=2", "--max_restarts=0", str(worker), *plans]
    if hold_back_s is None:
        return [sys.executable, "-m", launcher, *args]
    # the launcher with a shorter hold-back
    return [sys.executable, "-c", f"import sys, nanotronix.launch as m; m.HOLD_BACK_S = {hold_back_s}; "
                                  "sys.exit(m.main(sys.argv[1:]))", *args]


def test_a_planned_stop_is_one_line(tmp_path):
    # rank 1 is SIGTERMed by torchrun once rank 0 exited (-15): as the rank still in its teardown after a save
    code, out = launch(tmp_path, ("75", "75-late"))
    assert code == EXIT_PREEMPTED, out
    assert "torchrun on " in out and (": its 2 worker(s) stopped as planned (exit 75; the trainer's line above says "
                                      "what it saved): exit 75") in out, out
    for noise in ("Traceback", "ChildFailedError", "FAILED", "failed (exitcode", "Sending process", "exitcode"):
        assert noise not in out, (noise, out)


def torchrun_report(out: str) -> list[str]:
    """The agent's log lines and its failure table, numbers (pids, times) blanked; without the traceback's frames,
    which differ by the launcher's own."""
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if "ChildFailedError:" in line):]
    agent = [line for line in lines if re.match(r"[EW]\d{4} ", line)]
    return [re.sub(r"\d+", "N", line) for line in agent + table]


def test_a_failure_keeps_torchruns_report(tmp_path):
    # rank 1 raises; rank 0 is SIGTERMed by torchrun (-15): not a planned stop, as there is no 75
    code, out = launch(tmp_path, ("75-late", "raise"))
    want_code, want = launch(tmp_path, ("75-late", "raise"), launcher="torch.distributed.run")
    assert (code, want_code) == (1, 1), out
    assert torchrun_report(out) == torchrun_report(want), (out, want)
    assert "ValueError: rank 1 fails" in out and "Sending process" in out and "Signal 15 (SIGTERM)" in out, out
    assert "stopped as planned" not in out, out


def test_a_75_beside_a_failure_keeps_the_report_and_its_held_lines_come_in_time(tmp_path):
    """Rank 1 exits 75; rank 0, SIGTERMed by torchrun, fails 3 s later: the agent's lines held back in case it was a
    planned stop come out, in order, after the hold-back (1 s here), before rank 0's last words."""
    code, out = launch(tmp_path, ("slow-to-stop", "75"), hold_back_s=1.0)
    lines = out.splitlines()
    sending = next(i for i, line in enumerate(lines) if "Sending process" in line and "SIGTERM" in line)
    assert code == 1 and "ChildFailedError" in out and "stopped as planned" not in out, out
    assert sending < lines.index("rank 0 stops now"), out
    failed = [line for line in lines if "failed (exitcode: 75) local_rank: 1" in line]
    assert len(failed) == 1 and lines.index(failed[0]) > sending, out
    assert "exitcode  : 75" in out and "exitcode  : 1" in out, out


def launch_and_sigterm(tmp_path: Path, plans: tuple[str, str], launcher: str = "nanotronix.launch",
                       hold_back_s: float | None = None) -> tuple[int, str]:
    """(exit code, output) of `launcher` with 2 `term-*` workers, SIGTERMed with them once they are ready, as Slurm
    TERMs every process of a job step (scancel, the time limit)."""
    for ready in tmp_path.glob("ready-*"):
        ready.unlink()
    proc = subprocess.Popen(launch_command(tmp_path, (*plans, str(tmp_path)), launcher, hold_back_s), cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate(timeout=60)[0]
            time.sleep(0.05)
        for pid in [proc.pid] + [int(ready.read_text()) for ready in tmp_path.glob("ready-*")]:
            # the launcher passes its SIGTERM on at once, so a worker without a handler may be gone already: Slurm
            # signals the processes still there (CI once lost this race)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    return proc.returncode, out


def test_a_sigterm_stop_is_one_line(tmp_path):
    """Rank 1 has no handler yet (-15): as a trainer in its start-up, or in its teardown after the save. The save
    (0.5 s) takes longer than the hold-back (0.1 s here): the agent's lines about the SIGTERM are held till it ends."""
    code, out = launch_and_sigterm(tmp_path, ("term-75", "term-default"), hold_back_s=0.1)
    assert code == EXIT_PREEMPTED, out
    assert "rank 0 saved" in out and ("torchrun on " in out and ": stopped by SIGTERM; its 2 worker(s) stopped as "
                                      "planned (exit 75; the trainer's line above says what it saved): exit 75") in out
    for noise in ("Traceback", "SignalException", "death signal", "Sending process", "exitcode"):
        assert noise not in out, (noise, out)


def test_a_sigterm_stop_without_a_save_is_one_line(tmp_path):
    code, out = launch_and_sigterm(tmp_path, ("term-default", "term-default"))
    assert code == 128 + signal.SIGTERM, out
    assert ": stopped by SIGTERM; its 2 worker(s) ended without saving on it (exit codes -15, -15): exit 143" in out
    assert "Traceback" not in out and "death signal" not in out and "Sending process" not in out, out


def test_a_sigterm_with_a_worker_killed_keeps_torchruns_report(tmp_path):
    """Rank 0 saves, rank 1 is SIGKILLed (as torchrun ends a worker that outlives --shutdown-timeout): the stop did not
    go as planned: torchrun's agent lines and traceback, as plain torchrun's."""
    code, out = launch_and_sigterm(tmp_path, ("term-75", "term-killed"))
    want_code, want = launch_and_sigterm(tmp_path, ("term-75", "term-killed"), launcher="torch.distributed.run")
    assert (code, want_code) == (1, 1), out

    def agent_lines(text: str) -> list[str]:
        return [re.sub(r"\d+", "N", line) for line in text.splitlines()
                if re.match(r"[EW]\d{4} ", line) or "SignalException:" in line]
    assert agent_lines(out) == agent_lines(want) and "death signal" in out and "Traceback" in out, (out, want)
    assert "stopped by SIGTERM" not in out, out


def test_a_sigterm_with_a_worker_failing_keeps_torchruns_report(tmp_path):
    code, out = launch_and_sigterm(tmp_path, ("term-75", "term-fails"))
    assert code == 1 and "ValueError: rank 1 fails" in out and "SignalException: Process" in out, out
    assert "stopped by SIGTERM" not in out, out
