"""nanotronix.rendezvous_store, the c10d rendezvous store slurm/common.sh hosts for a job (its use by torchrun agents
across two Slurm nodes: tests/test_slurm.py, tests/test_slurm_failures.py). Here: torch's own TCPStore client talks to
it, a USR1 (what `scancel --signal=USR1 --batch` sends the batch shell's children) does not stop it, SIGTERM does
(exit 0), and a taken port is one line; started with SIGTERM ignored (slurm/common.sh), it outlives a SIGTERM and
stops on SIGHUP. ~7 s."""
import datetime
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, ignoring=()) -> subprocess.Popen:
    def ignore():
        for sig in ignoring:
            signal.signal(sig, signal.SIG_IGN)
    return subprocess.Popen([sys.executable, "-m", "nanotronix.rendezvous_store", "--port", str(port)], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ignore)


def test_store_serves_torch_clients_outlives_usr1_and_stops_on_term():
    from torch.distributed import TCPStore

    port = _free_port()
    store = _start(port)
    try:
        client = TCPStore("127.0.0.1", port, is_master=False, multi_tenant=True,
                          timeout=datetime.timedelta(seconds=30))  # (retries the connection while it starts)
        client.set("rank0", "ready")
        assert client.get("rank0") == b"ready" and client.add("joined", 2) == 2
        taken = _start(port)
        out, err = taken.communicate(timeout=60)
        assert taken.returncode == 2 and err.splitlines()[0].startswith(
            f"error: rendezvous store: cannot listen on port {port}: "), err
        assert len(err.strip().splitlines()) == 1, err
        _survives_then_stops(store, client, signal.SIGUSR1, signal.SIGTERM)
    finally:
        if store.poll() is None:
            store.kill()


@pytest.mark.parametrize("ignoring", [(signal.SIGUSR1, signal.SIGTERM),
                                      (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP)],
                         ids=["as-common-sh", "hup-ignored-too"])
def test_store_started_ignoring_sigterm_outlives_it_and_stops_on_hup(ignoring):
    """As slurm/common.sh starts it: Slurm's TERM (scancel, the time limit) reaches it with every process of the job,
    while the agents still report to it as their workers save and stop. Before, it stopped, and each agent logged
    TCPStore errors and a C++ stack dump. HUP, how common.sh stops it, stops it even when it was handed down ignored
    (a job or test run under nohup: the store outlived the HUP, and this test failed there every time)."""
    from torch.distributed import TCPStore

    port = _free_port()
    store = _start(port, ignoring=ignoring)
    try:
        client = TCPStore("127.0.0.1", port, is_master=False, multi_tenant=True,
                          timeout=datetime.timedelta(seconds=30))
        client.set("rank0", "ready")
        _survives_then_stops(store, client, signal.SIGTERM, signal.SIGHUP)
    finally:
        if store.poll() is None:
            store.kill()


def _survives_then_stops(store, client, ignored: int, stopping: int) -> None:
    """`ignored` leaves the store serving what the client set; `stopping` then ends it quietly, exit 0."""
    store.send_signal(ignored)
    time.sleep(0.5)
    assert store.poll() is None and client.get("rank0") == b"ready"
    store.send_signal(stopping)
    out, err = store.communicate(timeout=30)
    assert store.returncode == 0 and out == "" and err == "", (store.returncode, out, err)
