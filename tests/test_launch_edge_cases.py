"""`python -m nanotronix.launch` at its edges (cases that mutation testing showed no test held): a worker SIGKILLed
beside a 75 (an OOM kill, one that outlived torchrun's shutdown deadline) is a failure, not a planned stop; a SIGINT of
the launcher (Ctrl-C) is not a SIGTERM stop, whatever its workers exit with; the one line names Slurm's node, goes to
stderr, and `main(argv)` hands torchrun its argv; and which of the agent's log lines are held back (only a planned
stop's), how long (a SIGTERM's line holds them for torchrun's shutdown deadline), and that nothing is held after
`drop()`. The launches use the 2 stand-in workers of tests/launch_workers.py, ~4 s each; the log-line checks use
records made as torch's agent logs them (the format strings and arguments of torch/distributed/elastic)."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys

from helpers import ROOT
from launch_workers import ENV, WORKER, launch, launch_and_signal

from nanotronix.train import EXIT_PREEMPTED


def test_a_worker_sigkilled_beside_a_75_keeps_torchruns_report(tmp_path):
    """Rank 1 exits 75, rank 0 ends by a SIGKILL (-9) when torchrun then stops it: a worker was killed, so the stop
    did not go as planned (the module's docstring): torchrun's report and exit code, as plain torchrun's."""
    results = {}
    for launcher in ("nanotronix.launch", "torch.distributed.run"):
        results[launcher] = launch(tmp_path, ("killed-on-term", "75"), launcher)
    code, out = results["nanotronix.launch"]
    assert (code, results["torch.distributed.run"][0]) == (1, 1), out
    assert "exitcode  : 75" in out and "exitcode  : -9" in out and "ChildFailedError" in out, out
    assert "stopped as planned" not in out, out


def test_a_sigint_of_the_launcher_is_not_a_sigterm_stop(tmp_path):
    """Ctrl-C (SIGINT to the launcher and its workers) whose workers exit 75: only the agent's SIGTERM is the planned
    stop that the one line "stopped by SIGTERM" says; a SIGINT keeps torchrun's traceback and exit 1."""
    code, out, err = launch_and_signal(tmp_path, ("int-75", "int-75"), signal.SIGINT)
    out = out + err
    assert code == 1 and "SignalException" in out, out
    assert "stopped by SIGTERM" not in out and "stopped as planned" not in out, out


def test_the_line_names_slurms_node_on_stderr_and_main_passes_its_argv(tmp_path):
    """`main(argv)` launches what argv says (not the process's own argv, empty here); the planned stop's line names
    the node as Slurm does (SLURMD_NODENAME, which srun's own lines use) and goes to stderr, as torchrun's report."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    argv = ["--standalone", "--nproc_per_node=2", "--max_restarts=0", str(worker), "75", "75"]
    proc = subprocess.run([sys.executable, "-c", f"import sys, nanotronix.launch as m; sys.exit(m.main({argv!r}))"],
                          cwd=ROOT, env=dict(ENV, SLURMD_NODENAME="gpu-node-17"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, (proc.stdout, proc.stderr)
    line = ("torchrun on gpu-node-17: its 2 worker(s) stopped as planned (exit 75; the trainer's line above says what "
            "it saved): exit 75")
    assert line in proc.stderr.splitlines() and "stopped as planned" not in proc.stdout, (proc.stdout, proc.stderr)


def test_a_sigterm_stops_line_is_on_stderr(tmp_path):
    """The one line of a SIGTERM stop (workers without a handler yet: exit 143) goes to stderr, as torchrun's report
    it replaces; stdout is the workers' alone."""
    code, out, err = launch_and_signal(tmp_path, ("term-default", "term-default"), signal.SIGTERM)
    line = "its 2 worker(s) ended without saving on it (exit codes -15, -15): exit 143"
    assert code == 128 + signal.SIGTERM and line in err and "stopped by SIGTERM" not in out, (out, err)


# torch's agent's log calls (torch/distributed/elastic/multiprocessing/api.py and agent/server/api.py)
def failed(exitcode: int) -> logging.LogRecord:
    return record("torch.distributed.elastic.multiprocessing.api",
                  "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", (exitcode, 0, 1234, "worker.py"))


def sending(signame: str) -> logging.LogRecord:
    return record("torch.distributed.elastic.multiprocessing.api", "Sending process %s closing signal %s",
                  (1234, signame))


def received(sig: signal.Signals) -> logging.LogRecord:
    return record("torch.distributed.elastic.agent.server.api", "Received %s death signal, shutting down workers",
                  (sig,))


def record(name: str, msg: str, args: tuple) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 0, msg, args, None)


def test_only_a_planned_stops_agent_lines_are_held_back():
    """A planned stop's lines (a 75, torchrun's SIGTERM to a worker, the agent's own SIGTERM) are held back; a
    failure's (another exit code, a SIGKILL, a SIGINT) pass at once, as under torchrun."""
    from nanotronix.launch import HoldBack

    for line, held in ((failed(EXIT_PREEMPTED), True), (sending("SIGTERM"), True), (received(signal.SIGTERM), True),
                       (failed(1), False), (failed(-signal.SIGKILL), False), (sending("SIGKILL"), False),
                       (received(signal.SIGINT), False)):
        hold_back = HoldBack()
        try:
            assert hold_back.filter(line) is not held, (line.getMessage(), held)
        finally:
            hold_back.drop()


def test_a_sigterms_line_holds_the_held_lines_for_the_shutdown_deadline():
    """Lines held for HOLD_BACK_S (a 75's) are held for SHUTDOWN_HOLD_BACK_S from the agent's SIGTERM line on: its
    wait for its workers' saves (torchrun's shutdown deadline) is longer; the first timer is cancelled."""
    import nanotronix.launch as launch

    hold_back = launch.HoldBack()
    try:
        assert not hold_back.filter(failed(EXIT_PREEMPTED))
        first = hold_back.timer
        assert first is not None and first.interval == launch.HOLD_BACK_S
        assert not hold_back.filter(received(signal.SIGTERM))
        assert hold_back.timer is not first and hold_back.timer.interval == launch.SHUTDOWN_HOLD_BACK_S
        assert first.finished.is_set()  # cancelled
    finally:
        hold_back.drop()


def test_after_drop_or_release_every_line_passes():
    """Once a planned stop is said (drop) or its lines let through (release), nothing more is held back."""
    from nanotronix.launch import HoldBack

    for end in ("drop", "release"):
        hold_back = HoldBack()
        assert not hold_back.filter(failed(EXIT_PREEMPTED))
        getattr(hold_back, end)()
        assert hold_back.filter(sending("SIGTERM")) and hold_back.filter(failed(EXIT_PREEMPTED)), end
        assert not hold_back.held, end


def test_the_workers_exit_codes_are_every_workers_and_none_while_one_runs():
    """workers_exit_codes finds torchrun's agent in the traceback's frames and gives every worker's exit code, in
    rank order; None while any worker's is unknown (still running: a second signal cut the agent's wait short), so
    that a stop is never said to be planned for workers of which one has not ended."""
    from types import SimpleNamespace

    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import SignalException

    from nanotronix.launch import workers_exit_codes

    def agent_stopped(*codes: int | None) -> BaseException:
        agent = object.__new__(LocalElasticAgent)  # (its state only: no rendezvous)
        agent._pcontext = SimpleNamespace(subprocess_handlers={
            rank: SimpleNamespace(proc=SimpleNamespace(returncode=code)) for rank, code in enumerate(codes)})

        def run(self):  # as the agent's run(), in whose frame torchrun's exception passes
            raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)
        try:
            run(agent)
        except SignalException as e:
            return e
        raise AssertionError("unreachable")

    assert workers_exit_codes(agent_stopped(EXIT_PREEMPTED, -signal.SIGTERM)) == [EXIT_PREEMPTED, -signal.SIGTERM]
    assert workers_exit_codes(agent_stopped(0, EXIT_PREEMPTED, 1)) == [0, EXIT_PREEMPTED, 1]
    assert workers_exit_codes(agent_stopped(EXIT_PREEMPTED, None)) is None
    assert workers_exit_codes(agent_stopped()) is None
    assert workers_exit_codes(SignalException("no agent", sigval=signal.SIGTERM)) is None
