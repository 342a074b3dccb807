"""One user of a checkpoint.dir at a time: an exclusive `flock` on RUN_DIR/.lock, held by a run's rank 0 for the
run's life (Checkpointer) and by tools/rollback.py while it moves steps.

A second run into the same folder (a job submitted twice, a new experiment with resume=auto) would resume from the
first's steps and replace them with its own, and its start would delete the first's save in progress; a rollback
under a live run would be undone by the run's next save. A lock still held is waited for up to `wait_s` (NFS keeps
a dead node's lock until its lease runs out, ~90 s), then refused. File systems without locks (Lustre mounted
without flock) go unlocked, in a note. Written here because the standard library's fcntl is all it takes.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

from nanotronix.checkpoint import paths
from nanotronix.checkpoint.errors import CheckpointError


def acquire(run_dir: Path, wait_s: float, log: Callable[[str], None], refusal: str,
            name: str = "checkpoint.dir") -> Optional[int]:
    """The descriptor holding RUN_DIR/.lock (closing it releases the lock), or None where the folder cannot take
    the file or its file system has no locks. CheckpointError naming the folder as `name`, its holder, and
    `refusal` (why two users of one folder are refused, what to do), when it is still held after `wait_s` s."""
    lock = run_dir / paths.LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a folder that cannot take a file says so at its first write, in that write's own words
        return None
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if time.monotonic() >= deadline:
                os.close(fd)
                raise CheckpointError(f"{name} {run_dir} is in use by another run ({holder}; {lock}): "
                                      f"{refusal}") from None
            if not said:
                log(f"{lock} is held by {holder}: waiting up to {wait_s:.0f} s for it")
                said = True
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        except OSError as e:  # no locks on this file system: unprotected, which the user should know
            os.close(fd)
            log(f"{run_dir}'s file system takes no locks ({e.strerror or e}): a second user of {name} "
                f"{run_dir} would not be refused")
            return None
    try:  # who holds it, for the message of a user refused (advisory: a full disk may not take it)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    except OSError:
        pass
    return fd
