"""The trainer's console: rank 0's progress lines, notes and checkpoint lines on standard output.

Under a plain `torchrun ... > run.log` the console is a file on a disk that may fill up (or `/dev/full`, a pipe whose
reader is gone). A run is not stopped for its console: the first write that fails is said once on stderr and the
console goes quiet for the rest of the run; metrics.jsonl keeps every record (it has its own full-disk handling,
train/metrics.py). Its standard output is then pointed at /dev/null, because what the failed flush left buffered
would be written again at exit, fail again, and make Python exit 120 after a run that succeeded.
"""
from __future__ import annotations

import os
import sys

_quiet = False  # a write failed: the console says nothing more in this process


def say(line: str) -> None:
    """`line` on standard output, flushed; a failed write ends the console (once, with a warning), not the run."""
    global _quiet
    if _quiet:
        return
    try:
        print(line, flush=True)
    except OSError as e:
        _quiet = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # no file descriptor behind stdout: nothing is left to flush at exit
            pass
        try:
            sys.stderr.write(f"warning: cannot write the console output ({e.strerror or e}): training goes on, its "
                             "console lines stop here (the metrics file keeps every record)\n")
            sys.stderr.flush()
        except OSError:  # stderr on the same full disk: nothing can say it
            pass
