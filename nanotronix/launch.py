"""torchrun, saying a planned stop in one line: `python -m nanotronix.launch [torchrun's arguments]`.

A worker that saved a checkpoint on SIGUSR1/SIGTERM exits 75 (EXIT_PREEMPTED). torchrun takes any non-zero exit for
a failure: an error line, a Python traceback of its own and a failure table (~30 lines per node), then exit 1; in a
Slurm job that was a crash report at every planned stop. slurm/common.sh launches its agents through this module:
when this node's workers stopped as planned, the agent says so in one line and exits 75 instead. Any other end (a
worker that raised, exited otherwise or was killed; the agent itself failing) is torchrun's, its report and exit code
unchanged. This is torchrun's own code in the same process, so the workers' output streams as under torchrun.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from nanotronix.train import EXIT_PREEMPTED

# Two kinds of the agent's log lines come with every planned stop, before it is known whether it was one: "Sending
# process N closing signal SIGTERM" (torchrun stops the rest of the workers at the first exit it sees: those still in
# their teardown, one line each) and "failed (exitcode: 75) local_rank: 0 ...". They are held back, and let through
# when the launch ends otherwise, or after HOLD_BACK_S at most: a real failure's lines come that much later at worst,
# and still before the SIGKILL line of a worker that ignored the SIGTERM (torchrun's --shutdown-timeout, 30 s).
AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"
HOLD_BACK_S = 10.0


def is_planned_stop_line(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    if not isinstance(record.msg, str):
        return False
    return ((record.msg.startswith("Sending process ") and args[-1:] == ("SIGTERM",))
            or (record.msg.startswith("failed (exitcode: ") and args[:1] == (EXIT_PREEMPTED,)))


class HoldBack(logging.Filter):
    """On the agent's logger: holds back its planned-stop lines, and any after the first, until `release()` or
    `drop()`, HOLD_BACK_S at most."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.lock = threading.Lock()
        self.held: list[logging.LogRecord] = []
        self.done = False  # released or dropped: every line passes
        self.timer: threading.Timer | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        with self.lock:
            if self.done or not (self.held or is_planned_stop_line(record)):  # the lines after one held: in order
                return True
            self.held.append(record)
            if self.timer is None:
                self.timer = threading.Timer(HOLD_BACK_S, self.release)
                self.timer.daemon = True
                self.timer.start()
            return False

    def release(self) -> None:
        with self.lock:
            held, self.held, self.done = self.held, [], True
            if self.timer is not None:
                self.timer.cancel()
        for record in held:
            self.logger.handle(record)

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


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    agent_log = logging.getLogger(AGENT_LOGGER)
    held_back = HoldBack(agent_log)
    agent_log.addFilter(held_back)
    try:
        torchrun(argv)  # torch's @record-decorated entry point: its error file handling is kept
    except ChildFailedError as e:
        if not stopped_as_planned([failure.exitcode for failure in e.failures.values()]):
            raise  # torchrun's traceback and failure table, exit 1, as without this module
        held_back.drop()
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # Slurm's name: srun's lines use it too
        print(f"torchrun on {node}: its {len(e.failures)} worker(s) stopped as planned (exit "
              f"{EXIT_PREEMPTED}; the trainer's line above says what it saved): exit {EXIT_PREEMPTED}",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    finally:
        held_back.release()  # (nothing left after drop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
