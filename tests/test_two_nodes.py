"""Two nodes on one machine: two torchrun agents (one process each) joined by a static rendezvous, the second in its
own mount namespace (`unshare -m`, root), where a tmpfs mounted over part of the run's folder plays a folder that
node does not share with node 0. A checkpoint.dir on node-local disk would lose every checkpoint; ranks that read
checkpoint.dir each for themselves could resume from different steps: both must stop the run at start-up, on
every rank, rank 0 saying why in one line (the error is every rank's, so the others exit 2 without repeating it)."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, tiny_config, write_learnable_store


def _can_unshare_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _can_unshare_mounts(),
                                reason="needs `unshare -m` (root, util-linux) to give one node its own mounts")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], node1_tmpfs=None, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`python -m torch.distributed.run ... ARGS` as node 0 and node 1 of 2 (rank 0 and rank 1); node 1 runs with a
    fresh tmpfs over `node1_tmpfs` when given."""
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", *args]
        if node == 1 and node1_tmpfs is not None:
            cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(node1_tmpfs), *cmd]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for cmd_proc in procs:
        out, err = cmd_proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(cmd_proc.args, cmd_proc.returncode, out, err))
    return results


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The worker's `error:` lines; a traceback other than torchrun's own report of a failed worker is a bug."""
    assert proc.stderr.count("Traceback") == proc.stderr.count("raise ChildFailedError("), proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def assert_stopped_quietly(proc: subprocess.CompletedProcess) -> None:
    """A rank that stops with an error rank 0 reports: exit 2 (bad input), nothing of its own said."""
    assert error_lines(proc) == [] and "exitcode  : 2 " in proc.stderr, proc.stderr[-3000:]


def test_two_nodes_train_and_resume_when_the_folder_is_shared(tmp_path, store):
    """The reference: the same two-node launch over a shared folder trains, saves and resumes (so the failures
    below are the folder's, not the launch's)."""
    cfg = tiny_config(tmp_path, store, checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 2})
    args = ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=2"]
    first = two_nodes(args)
    assert [p.returncode for p in first] == [0, 0], [p.stderr[-2000:] for p in first]
    again = two_nodes(args[:-1] + ["train.train_steps=4"])
    assert [p.returncode for p in again] == [0, 0], [p.stderr[-2000:] for p in again]
    assert "resumed from " in again[0].stdout and "at step 2" in again[0].stdout, again[0].stdout
    assert not list((tmp_path / "ckpt").glob(".nanotronix-shared-*"))  # the start-up marker is removed


def test_checkpoint_dir_not_shared_between_nodes_stops_the_run_at_start(tmp_path, store):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = tiny_config(tmp_path, store, checkpoint={"dir": str(ckpt), "interval": 2})
    procs = two_nodes(["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=2"], node1_tmpfs=ckpt)
    assert all(p.returncode != 0 for p in procs), [p.stdout[-2000:] for p in procs]
    expected = (f"error: checkpoint.dir {ckpt} is not one folder shared by every node: rank 1, "
                f"{socket.gethostname()} does not see the file .nanotronix-shared-")
    lines = error_lines(procs[0])
    assert len(lines) == 1 and lines[0].startswith(expected), procs[0].stderr[-3000:]
    assert lines[0].endswith("every rank saves its part of each checkpoint into that folder, so it must be on a "
                             "file system all nodes mount"), lines
    assert_stopped_quietly(procs[1])
    assert all("step 1/" not in p.stdout for p in procs)
    assert not list(ckpt.glob("step_*")) and not list(ckpt.glob(".nanotronix-shared-*"))


def test_resume_step_is_chosen_by_rank_0_and_must_be_seen_by_every_rank(tmp_path, store):
    """Node 1 does not see the newest step (an empty folder in its place, as a file system that shows it late
    would): it must not resume from the step before while rank 0 resumes from the newest."""
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(tmp_path, store, checkpoint={"dir": str(ckpt), "interval": 2})
    args = ["-m", "nanotronix.train", "--config", str(cfg)]
    first = two_nodes(args + ["train.train_steps=4"])
    assert [p.returncode for p in first] == [0, 0], [p.stderr[-2000:] for p in first]
    newest = ckpt / "step_0000004"
    assert newest.is_dir() and (ckpt / "step_0000002").is_dir()
    procs = two_nodes(args + ["train.train_steps=6"], node1_tmpfs=newest)
    assert all(p.returncode != 0 for p in procs), [p.stdout[-2000:] for p in procs]
    assert error_lines(procs[0]) == [
        f"error: rank 1 ({socket.gethostname()}) does not see checkpoint {newest}, which rank 0 resumes from: "
        "checkpoint.dir and checkpoint.resume must be on a file system every node mounts"], procs[0].stderr[-3000:]
    assert_stopped_quietly(procs[1])
    assert all("resumed from" not in p.stdout and "step 5/" not in p.stdout for p in procs)
