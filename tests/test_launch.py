"""`python -m nanotronix.launch` (torchrun for slurm/common.sh) on 2 stand-in workers (launch_workers.py): a
planned stop (every worker exits 75, or is SIGTERMed by torchrun in its teardown) is one line and exit 75; a failure
is torchrun's own report, the same lines as plain torchrun's (~4 s a launch). Likewise when the launcher itself is
SIGTERMed (scancel, a time limit) with its workers: one line when they stopped as a trainer does, torchrun's
traceback when one failed."""
from __future__ import annotations

import re
import signal
from pathlib import Path

from launch_workers import launch, launch_and_signal

from nanotronix.train import EXIT_PREEMPTED


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
    """(exit code, stdout then stderr) of `launcher` with 2 `term-*` workers, SIGTERMed with them once ready."""
    code, out, err = launch_and_signal(tmp_path, plans, signal.SIGTERM, launcher, hold_back_s)
    return code, out + err


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


def test_a_sigterm_stop_where_one_worker_had_finished_says_how_many_saved(tmp_path):
    """Rank 0 had finished its run (exit 0) when the SIGTERM came, rank 1 saved (75): not a planned stop of every
    worker (exit 143, as any end without every worker's save), and the line says that one of them saved."""
    code, out = launch_and_sigterm(tmp_path, ("term-0", "term-75"))
    assert code == 128 + signal.SIGTERM, out
    assert ": stopped by SIGTERM; its 2 worker(s) ended on it, 1 of them saving (exit codes 0, 75): exit 143" in out
    assert "Traceback" not in out and "without saving" not in out, out


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
