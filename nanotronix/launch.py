"""torchrun, saying a planned stop in one line: `python -m nanotronix.launch [torchrun's arguments]`.

A worker that saved a checkpoint on SIGUSR1/SIGTERM exits 75 (EXIT_PREEMPTED). torchrun takes any non-zero exit for
a failure: an error line, a Python traceback of its own and a failure table (~30 lines per node), then exit 1; in a
Slurm job that was a crash report at every planned stop. slurm/common.sh launches its agents through this module:
when this node's workers stopped as planned, the agent says so in one line and exits 75 instead. Any other end (a
worker that raised, exited otherwise or was killed; the agent itself failing) is torchrun's, its report and exit code
unchanged. This is torchrun's own code in the same process, so the workers' output streams as under torchrun.

SIGTERM (scancel, a Slurm time limit, `scontrol requeue`) reaches the agent as well as its workers: torchrun's
handler raises SignalException, the agent SIGTERMs its workers and waits for them (--shutdown-timeout, 30 s by
default, then SIGKILL), and the exception ended torchrun with a Python traceback and exit 1 though the stop went as
planned. When every worker ended as a SIGTERM ends a trainer (75 after its save, -15 if it had no handler yet, 0 if
it had finished), the agent says so in one line instead, and exits 75 when they saved (as on USR1), 143 (a process
that SIGTERM ended) otherwise. A worker that failed, or outlived the deadline (SIGKILLed), keeps torchrun's ending.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from nanotronix.cli import EXIT_TERMINATED
from nanotronix.train import EXIT_PREEMPTED

# Two kinds of the agent's log lines come with every planned stop, before it is known whether it was one: "Sending
# process N closing signal SIGTERM" (torchrun stops the rest of the workers at the first exit it sees: those still in
# their teardown, one line each) and "failed (exitcode: 75) local_rank: 0 ...". They are held back, and let through
# when the launch ends otherwise, or after HOLD_BACK_S at most: a real failure's lines come that much later at worst,
# and still before the SIGKILL line of a worker that ignored the SIGTERM (torchrun's --shutdown-timeout, 30 s).
# A SIGTERM of the agent adds its "Received 15 death signal, shutting down workers": from then on the agent only waits
# for its workers, torchrun's shutdown deadline (30 s by default) and a SIGKILL at most, so its lines are held that
# long (a trainer's save on SIGTERM often takes more than HOLD_BACK_S).
AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")
HOLD_BACK_S = 10.0
SHUTDOWN_HOLD_BACK_S = 30.0 + HOLD_BACK_S


def log_args(record: logging.LogRecord) -> tuple:
    return record.args if isinstance(record.args, tuple) else ()


def is_sigterm_line(record: logging.LogRecord) -> bool:
    return (isinstance(record.msg, str) and record.msg.startswith("Received ") and "death signal" in record.msg
            and log_args(record)[:1] == (signal.SIGTERM,))


def is_planned_stop_line(record: logging.LogRecord) -> bool:
    args = log_args(record)
    if not isinstance(record.msg, str):
        return False
    return ((record.msg.startswith("Sending process ") and args[-1:] == ("SIGTERM",))
            or (record.msg.startswith("failed (exitcode: ") and args[:1] == (EXIT_PREEMPTED,))
            or is_sigterm_line(record))


class HoldBack(logging.Filter):
    """On the agent's loggers: holds back their planned-stop lines, and any after the first, until `release()` or
    `drop()`, HOLD_BACK_S at most (SHUTDOWN_HOLD_BACK_S from a SIGTERM's line)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.held: list[logging.LogRecord] = []
        self.done = False  # released or dropped: every line passes
        self.timer: threading.Timer | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        with self.lock:
            if self.done or not (self.held or is_planned_stop_line(record)):  # the lines after one held: in order
                return True
            self.held.append(record)
            if self.timer is None or is_sigterm_line(record):
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = threading.Timer(SHUTDOWN_HOLD_BACK_S if is_sigterm_line(record) else HOLD_BACK_S,
                                             self.release)
                self.timer.daemon = True
                self.timer.start()
            return False

    def release(self) -> None:
        with self.lock:
            held, self.held, self.done = self.held, [], True
            if self.timer is not None:
                self.timer.cancel()
        for record in held:
            logging.getLogger(record.name).handle(record)

    def drop(self) -> None:
        with self.lock:
            self.held, self.done = [], True
            if self.timer is not None:
                self.timer.cancel()


def stopped_as_planned(exit_codes: list[int]) -> bool:
    """The workers' non-zero exit codes (torchrun's failures) are those of a planned stop: 75, and -SIGTERM for a rank
    that torchrun itself terminated once another had exited (it stops the rest at the first exit it sees): one still
    in its teardown after the save, whose SIGTERM handler is gone by then. While a rank trains, its handler turns a
    SIGTERM into a save and exit 75, and the ranks stop together at the same step, so a -15 there is one of those."""
    return EXIT_PREEMPTED in exit_codes and all(code in (EXIT_PREEMPTED, -signal.SIGTERM) for code in exit_codes)


def stopped_by_sigterm(exit_codes: list[int]) -> bool:
    """The workers' exit codes after the agent's SIGTERM are those of trainers that the SIGTERM stopped: 75 (saved),
    -SIGTERM (no handler yet: in its start-up, or its teardown after a save) or 0 (the run had finished)."""
    return bool(exit_codes) and all(code in (0, EXIT_PREEMPTED, -signal.SIGTERM) for code in exit_codes)


def workers_exit_codes(error: BaseException) -> list[int] | None:
    """The exit codes of the workers of the agent that `error` went through, once the agent has stopped them
    (torchrun keeps the agent to itself: it is found in the traceback's frames); None when one is unknown (still
    running: a second signal cut the agent's wait short, or a worker stuck after its SIGKILL). (torchrun installs
    its SIGTERM handler when it starts its workers: a SIGTERM before that ends it at once, without a traceback.)"""
    from torch.distributed.elastic.agent.server import SimpleElasticAgent

    tb = error.__traceback__
    while tb is not None:
        agent = tb.tb_frame.f_locals.get("self")
        if isinstance(agent, SimpleElasticAgent):
            workers = getattr(agent, "_pcontext", None)
            handlers = getattr(workers, "subprocess_handlers", None) or {}  # torchrun's workers: processes it ran
            codes = [handler.proc.returncode for handler in handlers.values()]
            return codes if codes and None not in codes else None
        tb = tb.tb_next
    return None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    held_back = HoldBack()
    for name in AGENT_LOGGERS:
        logging.getLogger(name).addFilter(held_back)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # Slurm's name: srun's lines use it too
    planned = f"stopped as planned (exit {EXIT_PREEMPTED}; the trainer's line above says what it saved)"
    try:
        torchrun(argv)  # torch's @record-decorated entry point: its error file handling is kept
    except ChildFailedError as e:
        if not stopped_as_planned([failure.exitcode for failure in e.failures.values()]):
            raise  # torchrun's traceback and failure table, exit 1, as without this module
        held_back.drop()
        print(f"torchrun on {node}: its {len(e.failures)} worker(s) {planned}: exit {EXIT_PREEMPTED}",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except SignalException as e:
        codes = workers_exit_codes(e)
        if e.sigval != signal.SIGTERM or codes is None or not stopped_by_sigterm(codes):
            raise  # torchrun's traceback (a worker's own report is above it), exit 1, as without this module
        held_back.drop()
        # Not exit 1 (torchrun's): slurm/common.sh only asks whether the step's exit was 0, and says the number.
        if stopped_as_planned(codes):
            what, code = f"its {len(codes)} worker(s) {planned}", EXIT_PREEMPTED
        else:  # not every worker saved: -15s (no handler yet) beside 0s (the run had finished), maybe some 75s
            exits, saved = ", ".join(map(str, codes)), codes.count(EXIT_PREEMPTED)
            how = f"ended on it, {saved} of them saving" if saved else "ended without saving on it"
            what, code = f"its {len(codes)} worker(s) {how} (exit codes {exits})", EXIT_TERMINATED
        print(f"torchrun on {node}: stopped by SIGTERM; {what}: exit {code}", file=sys.stderr, flush=True)
        return code
    finally:
        held_back.release()  # (nothing left after drop())
    return 0


if __name__ == "__main__":
    sys.argv[0] = "python -m nanotronix.launch"  # torchrun's parser names the command from it (else "launch.py")
    sys.exit(main())
