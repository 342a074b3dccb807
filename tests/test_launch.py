"""`python -m nanotronix.launch` (torchrun for slurm/common.sh) on 2 stand-in workers, each told what to do: a
planned stop (every worker exits 75, or is SIGTERMed by torchrun in its teardown) is one line and exit 75; a failure
is torchrun's own report, the same lines as plain torchrun's (~4 s a launch)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
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
"""


def launch(tmp_path: Path, plans: tuple[str, str], launcher: str = "nanotronix.launch",
           hold_back_s: float | None = None) -> tuple[int, str]:
    """(exit code, stdout and stderr together, in order) of `launcher` with 2 workers following `plans`."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = ["--standalone", "--nproc_per_node=2", "--max_restarts=0", str(worker), *plans]
    if hold_back_s is None:
        cmd = [sys.executable, "-m", launcher, *args]
    else:  # the launcher with a shorter hold-back
        cmd = [sys.executable, "-c", f"import sys, nanotronix.launch as m; m.HOLD_BACK_S = {hold_back_s}; "
                                     "sys.exit(m.main(sys.argv[1:]))", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    return proc.returncode, proc.stdout


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
