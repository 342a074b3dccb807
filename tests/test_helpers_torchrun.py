"""tests/helpers.py's torchrun: a launch that runs past its timeout takes its workers with it. torchrun starts each
worker in a session of its own, so killing the launcher alone (what subprocess.run does on a timeout) would leave
them running on the shared cores, holding a rendezvous or waiting in a collective, until something else kills them."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from helpers import torchrun

WORKER = """
import os, sys, time
open(os.path.join(sys.argv[1], f"pid{os.environ['RANK']}"), "w").write(str(os.getpid()))
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_launch_past_its_timeout_leaves_no_worker_running(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with pytest.raises(subprocess.TimeoutExpired):
        torchrun(2, [str(script), str(tmp_path)], timeout=15)  # ample: torchrun and the workers start in ~2 s
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("pid*"))]
    assert len(pids) == 2, "the workers did not start within the timeout"
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:  # this test's own workers, by id
        os.kill(pid, 9)
    assert not left, f"workers {left} outlived their launcher's timeout"
