"""torchrun worker for tests/test_hang_report.py: the real trainer, with rank 1 made to stall at two steps.

Rank 1's batch for step 3 takes 6 s, as when its filesystem stalls (rank 1 is *behind*: rank 0 waits for it in the
step's gradient reduction). At step 6 rank 1 stops itself with SIGSTOP, and a child process wakes it 5 s later
(rank 1 is *not responding*: its process runs nothing at all, the watching thread included).
"""
import os
import signal
import subprocess
import sys
import time

from nanotronix.data.prefetch import PrefetchingLoader
from nanotronix.train.main import main

_batch = PrefetchingLoader.batch


def stalled_filesystem_read() -> None:
    time.sleep(6)


def stalling_batch(self, step: int):
    if os.environ["RANK"] == "1" and step == 3:
        stalled_filesystem_read()
    if os.environ["RANK"] == "1" and step == 6:
        subprocess.Popen(["sh", "-c", f"sleep 5; kill -CONT {os.getpid()}"])
        os.kill(os.getpid(), signal.SIGSTOP)
    return _batch(self, step)


PrefetchingLoader.batch = stalling_batch
main(sys.argv[1:])
