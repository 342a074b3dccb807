"""Preemption: SIGTERM or SIGUSR1 makes the trainer finish its step, save on every rank, and exit with
EXIT_PREEMPTED (75). SIGTERM to a single process; SIGUSR1 to ONE rank of a 2-rank torchrun job (the other must
stop at the same step), and to a torchrun told to pass it on; a SIGTERM or Ctrl-C while DCP loads or saves (in this
process, and on one rank of two); SIGBUS from a store cut short under the run. Costs ~45-60 s (short training
launches)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, run, tiny_config, two_gloo_ranks, write_learnable_store

from nanotronix.train import EXIT_PREEMPTED


@pytest.fixture(autouse=True)
def _sigint_as_it_was():
    """An in-process run stopped by Ctrl-C leaves SIGINT ignored (a worker must: torchrun passes it on again), which
    the tests after it, in this process, must not inherit (one that sends SIGINT would see nothing happen)."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


_LAUNCHED: list[subprocess.Popen] = []


def _launch(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _LAUNCHED.append(proc)
    return proc


def _descendants(pid: int) -> list[int]:
    try:
        children = _children(pid)
    except OSError:  # gone meanwhile
        return []
    return [d for c in children for d in (c, *_descendants(c))]


@pytest.fixture(autouse=True)
def _no_run_left_behind():
    """A test that fails while its run goes on (a stop that never came: communicate's timeout) kills what it
    launched, torchrun's workers too (their own sessions), instead of leaving a 100,000-step run on the machine."""
    yield
    while _LAUNCHED:
        proc = _LAUNCHED.pop()
        if proc.poll() is None:
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.communicate()


def _wait_for_step(metrics: Path, proc: subprocess.Popen, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"training did not reach step {step}")


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"])


def _check_saved_last_step(tmp_path: Path, world_size: int) -> int:
    steps = [json.loads(line)["step"] for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    folder = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text().strip()
    manifest = json.loads((folder / "checkpoint.json").read_text())
    assert manifest["step"] == steps[-1]  # the step in flight was finished, then saved
    assert manifest["layout"]["world_size"] == world_size
    assert sorted(p.name for p in (folder / "rng").iterdir()) == [f"rank_{r:05d}.pt" for r in range(world_size)]
    return manifest["step"]


def _config(tmp_path: Path, store: Path | None = None) -> Path:
    store = store or write_learnable_store(tmp_path / "store" / "arith")
    return tiny_config(tmp_path, store, train={"train_steps": 100000},
                       checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 0})


def test_sigterm_saves_and_exits_75(tmp_path):
    proc = _launch(["-m", "nanotronix.train", "--config", str(_config(tmp_path))], ROOT)
    _wait_for_step(tmp_path / "logs" / "metrics.jsonl", proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    step = _check_saved_last_step(tmp_path, world_size=1)
    assert f"checkpoint: received SIGTERM: saved step {step}" in out


def test_sigusr1_to_one_rank_stops_all_ranks(tmp_path):
    proc = _launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanotronix.train",
                    "--config", str(_config(tmp_path))], ROOT)
    _wait_for_step(tmp_path / "logs" / "metrics.jsonl", proc, 3)
    workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
    assert set(workers) == {0, 1}
    os.kill(workers[1], signal.SIGUSR1)  # rank 0 hears nothing: it must learn from rank 1
    out, _ = proc.communicate(timeout=120)
    step = _check_saved_last_step(tmp_path, world_size=2)
    assert f"checkpoint: received SIGUSR1: saved step {step}" in out  # printed by rank 0
    # torchrun reports each worker's exit code (it exits 1 itself when a worker exits non-zero).
    assert out.count(f"exitcode  : {EXIT_PREEMPTED}") == 2, out[-3000:]


def test_sigusr1_to_a_torchrun_told_to_handle_it_stops_every_rank_with_a_save(tmp_path):
    """torchrun dies of SIGUSR1 by default; started with --signals-to-handle naming it (the README's other way), it
    passes it on to its workers as it does SIGTERM, and every rank saves the step in flight."""
    proc = _launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m", "nanotronix.train",
                    "--config", str(_config(tmp_path))], ROOT)
    _wait_for_step(tmp_path / "logs" / "metrics.jsonl", proc, 3)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    step = _check_saved_last_step(tmp_path, world_size=2)
    assert f"checkpoint: received SIGUSR1: saved step {step}" in out, out[-3000:]
    # torchrun reports the signal it handled (its SignalException) and exits 1, as for SIGTERM
    assert proc.returncode == 1 and "SignalException: Process" in out and "got signal: 10" in out, out[-3000:]

def test_a_store_cut_short_under_the_run_ends_it_with_each_threads_stack(tmp_path):
    """A store's .bin shortened while the trainer maps it (rewritten in place): the kernel kills the process with
    SIGBUS at its next read past the new end, and faulthandler prints each thread's stack, the format's reader among
    them but not the store's path (the README says so); inspect_store names the shortened file."""
    store = write_learnable_store(tmp_path / "store" / "arith", num_docs=20000)
    bin_file = Path(f"{store}.bin")
    size = bin_file.stat().st_size
    proc = _launch(["-m", "nanotronix.train", "--config", str(_config(tmp_path, store))], ROOT)
    _wait_for_step(tmp_path / "logs" / "metrics.jsonl", proc, 3)
    os.truncate(bin_file, 4096)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGBUS, out[-3000:]
    fault = out[out.index("Fatal Python error: Bus error"):]
    assert "megatron_store.py" in fault and " in read_windows" in fault and str(store) not in fault, fault
    said = run(["tools/inspect_store.py", str(store)])
    assert said.returncode == 2, said
    assert said.stderr.strip() == f"error: {bin_file}: truncated (4096 bytes, the index needs {size})", said.stderr

def test_workers_whose_torchrun_is_gone_save_and_stop(tmp_path):
    """torchrun killed (here SIGKILL; a SIGUSR1 sent to it instead of its workers kills it too) leaves its workers
    running without it: they notice at the next step (their parent changed), save it on every rank and stop with
    75, instead of training alone to the run's last step (100,000 here) holding the run's lock."""
    proc = _launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanotronix.train",
                    "--config", str(_config(tmp_path))], ROOT)
    _wait_for_step(tmp_path / "logs" / "metrics.jsonl", proc, 3)
    workers = _children(proc.pid)
    assert len(workers) == 2
    proc.kill()
    try:
        out, _ = proc.communicate(timeout=120)  # the pipe closes when the workers, which hold it too, have exited
    finally:  # workers that train on must not outlive the test
        for pid in workers:
            if not _exited(pid):
                with contextlib.suppress(ProcessLookupError):  # it may end between the look and the kill
                    os.kill(pid, signal.SIGKILL)
    step = _check_saved_last_step(tmp_path, world_size=2)
    assert f"checkpoint: torchrun, the launcher of a rank, is gone: saved step {step}; stopping (exit 75" in out, \
        out[-3000:]
    assert all(_exited(pid) for pid in workers)


def _exited(pid: int) -> bool:
    """Gone, or a zombie (exited; the process that adopted it may not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_ctrl_c_stops_every_rank_with_one_line(tmp_path):
    """Ctrl-C in a terminal: SIGINT to the whole foreground process group (torchrun and its 2 workers). The run stops
    where it is, without saving; rank 0 says where in one line, and no worker prints a KeyboardInterrupt traceback."""
    store = write_learnable_store(tmp_path / "arith")
    cfg = tiny_config(tmp_path, store, checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 1000})
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=100000"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_step(tmp_path / "logs" / "metrics.jsonl", proc, 3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    said = [line for line in err.splitlines() if line.startswith("interrupted ")]
    assert len(said) == 1 and said[0].startswith("interrupted in step "), err[-3000:]
    assert "no checkpoint saved yet, so a rerun starts over" in said[0]  # checkpoint.interval 1000: none yet
    assert "KeyboardInterrupt" not in err and "[rank" not in err, err[-3000:]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").glob("step_*"))



def _stopped_in_dcp(monkeypatch, where: str, stop) -> None:
    """`stop()` each time DCP reads (where="read") or writes (where="write") a step's data: a signal landing during a
    load or save, most of the time either takes at scale."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    cls = FileSystemReader if where == "read" else FileSystemWriter
    real = getattr(cls, f"{where}_data")

    def stopped(self, plan, planner):
        stop()
        return real(self, plan, planner)

    monkeypatch.setattr(cls, f"{where}_data", stopped)


def _ctrl_c():
    raise KeyboardInterrupt


def test_ctrl_c_while_dcp_loads_or_saves_is_the_trainers_interrupted_line(tmp_path, monkeypatch):
    """Ctrl-C during the resume's load or during a save: the trainer's own Interrupted (rank 0's "interrupted ..."
    line, exit 130), not DCP's CheckpointException turned into "cannot read/write checkpoint ... (on rank 0:
    KeyboardInterrupt: )" with the bad-input exit code 2. During a save, the line says that save was abandoned and
    which step a rerun resumes from (not that SIGTERM "would have saved this step first": it was being saved)."""
    from checkpoint_helpers import train_in_process

    from nanotronix.train import Interrupted
    cfg = _config(tmp_path)
    with monkeypatch.context() as patched:
        _stopped_in_dcp(patched, "write", _ctrl_c)
        with pytest.raises(Interrupted) as stopped:
            train_in_process(cfg, "train.train_steps=2")
        assert str(stopped.value) == ("interrupted in step 2 (checkpoint): the save of step 2 was abandoned; no "
                                      "checkpoint saved yet, so a rerun starts over (the next save removes the "
                                      "partial one)")
    train_in_process(cfg, "train.train_steps=2")
    with monkeypatch.context() as patched:
        _stopped_in_dcp(patched, "read", _ctrl_c)
        with pytest.raises(Interrupted, match="^interrupted .*nothing saved since step_0000002, which a rerun resumes "
                                              r"from \(SIGTERM or SIGUSR1 would have saved this step first\)$"):
            train_in_process(cfg, "train.train_steps=4")
    with monkeypatch.context() as patched:
        _stopped_in_dcp(patched, "write", _ctrl_c)
        with pytest.raises(Interrupted) as stopped:
            train_in_process(cfg, "train.train_steps=3")
        assert str(stopped.value) == ("interrupted in step 3 (checkpoint): the save of step 3 was abandoned; the "
                                      "latest committed checkpoint is step_0000002, which a rerun resumes from (the "
                                      "next save removes the partial one)")
    assert (tmp_path / "ckpt" / ".step_0000003.tmp").is_dir()  # the partial one, never read
    with monkeypatch.context() as patched:  # Ctrl-C after the commit's rename (in the pruning): the step is saved
        patched.setattr("nanotronix.checkpoint.paths.prune", lambda *args: _ctrl_c())
        with pytest.raises(Interrupted) as stopped:
            train_in_process(cfg, "train.train_steps=3")
        assert str(stopped.value) == ("interrupted in step 3 (checkpoint): step 3 was saved, as step_0000003, which a "
                                      "rerun resumes from")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".step")) == []


def test_ctrl_c_reaching_a_worker_twice_lets_the_background_save_commit_before_the_line(tmp_path, monkeypatch):
    """Ctrl-C reaches a worker twice (the terminal's process group, then torchrun passing it on). The first, in step
    2 while step 1's background save writes, waits for that save to commit; the second must not cut that wait short:
    the write would go on (the interpreter's exit waits for its thread) and commit step 1 while the line said that no
    checkpoint was saved yet."""
    import threading

    from checkpoint_helpers import train_in_process
    from torch.distributed.checkpoint import FileSystemWriter

    import nanotronix.train.trainer as trainer
    from nanotronix.train import Interrupted
    real_write, real_step = FileSystemWriter.write_data, trainer.train_step
    steps = []

    def slow_write(self, plan, planner):
        time.sleep(2)  # the second SIGINT lands while the first's handling waits for this save
        return real_write(self, plan, planner)

    def ctrl_c_twice_in_step_2(model, optimizer, batch, lr, *args):
        steps.append(lr)
        if len(steps) == 2:  # step 1 done: its save is writing in the background
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # torchrun passing it on
            os.kill(os.getpid(), signal.SIGINT)  # the terminal's
        return real_step(model, optimizer, batch, lr, *args)

    monkeypatch.setattr(FileSystemWriter, "write_data", slow_write)
    monkeypatch.setattr(trainer, "train_step", ctrl_c_twice_in_step_2)
    with pytest.raises(Interrupted) as stopped:
        train_in_process(_config(tmp_path), "checkpoint.interval=1", "checkpoint.async_save=true",
                         "train.train_steps=3")
    assert str(stopped.value) == ("interrupted in step 2 (train step): nothing saved since step_0000001, which a "
                                  "rerun resumes from (SIGTERM or SIGUSR1 would have saved this step first)")
    assert (tmp_path / "ckpt" / "step_0000001" / "checkpoint.json").is_file()  # committed before the line said so


def test_sigterm_while_the_resume_loads_saves_the_next_step_and_stops(tmp_path, monkeypatch, capsys):
    """SIGTERM during the resume's load only sets the trainer's flag (its handler is installed before the resume):
    the load completes, the next step is trained, saved, and the run stops as preempted (exit 75), no traceback."""
    from checkpoint_helpers import train_in_process
    cfg = _config(tmp_path)
    train_in_process(cfg, "train.train_steps=2")
    _stopped_in_dcp(monkeypatch, "read", lambda: os.kill(os.getpid(), signal.SIGTERM))
    capsys.readouterr()
    assert train_in_process(cfg, "train.train_steps=4")["preempted"]
    assert "checkpoint: received SIGTERM: saved step 3; stopping (exit 75" in capsys.readouterr().out
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000003"


# Rank 1 of a 2-rank gloo group stopped (Ctrl-C) while DCP writes, then while it reads, its data; rank 0 not.
ONE_RANK_STOPPED_IN_DCP = """
import sys, time
from datetime import timedelta
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from nanotronix.checkpoint import paths, rng, storage

rank, run_dir, rendezvous = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=60))
coll, state = storage.Collective(), {f"w{rank}": torch.ones(100)}

def stopped(self, plan, planner):
    raise KeyboardInterrupt

def said(what, run):
    t0 = time.monotonic()
    try:
        run()
        print(f"rank {rank}: {what}: returned", flush=True)
    except BaseException as e:  # what reached the caller, and whether this rank waited for the other's exit
        print(f"rank {rank}: {what}: {type(e).__name__} within 10 s: {time.monotonic() - t0 < 10}", flush=True)

real_write = FileSystemWriter.write_data
if rank == 1:
    FileSystemWriter.write_data = stopped
said("save", lambda: storage.write_step(run_dir, 1, state, {"step": 1}, rng.capture_rng(), rank, coll,
                                        paths.Retention()))
FileSystemWriter.write_data = real_write
said("clean save", lambda: storage.write_step(run_dir, 1, state, {"step": 1}, rng.capture_rng(), rank, coll,
                                              paths.Retention()))
if rank == 1:
    FileSystemReader.read_data = stopped
said("load", lambda: storage.read_step(run_dir / "step_0000001", {f"w{rank}": torch.zeros(100)}, coll))
"""


def test_ctrl_c_on_one_rank_while_dcp_saves_or_loads_is_raised_on_every_rank_at_once(tmp_path):
    """DCP gathers every rank's failure into the CheckpointException that each rank raises, so a Ctrl-C that landed
    on one rank during a save or a load is raised as itself on every rank at once (the trainer's Interrupted line
    on each), none left waiting for the stopped one in write_step's gather (before: "cannot write/read checkpoint
    ... (on rank 1: KeyboardInterrupt: )", the bad-input error, on every rank)."""
    outs = [out for _, out in two_gloo_ranks(ONE_RANK_STOPPED_IN_DCP, tmp_path, timeout=90)]
    for rank, out in enumerate(outs):
        lines = [line for line in out.splitlines() if line.startswith(f"rank {rank}: ")]
        assert lines == [f"rank {rank}: save: KeyboardInterrupt within 10 s: True",
                         f"rank {rank}: clean save: returned",
                         f"rank {rank}: load: KeyboardInterrupt within 10 s: True"], outs


# The trainer in a process of its own, sending itself SIGTERM while step AT trains (as a scheduler might at any time).
SIGNAL_AT_STEP = """
import os, signal, sys
import nanotronix.train.trainer as trainer
train_step, at = trainer.train_step, int(sys.argv[1])
def signalling(*args, **kwargs):
    signalling.calls += 1
    if signalling.calls == at:
        os.kill(os.getpid(), signal.SIGTERM)
    return train_step(*args, **kwargs)
signalling.calls = 0
trainer.train_step = signalling
from nanotronix.train.main import main
sys.argv = ["nanotronix.train", *sys.argv[2:]]
sys.exit(main())
"""


def test_a_signal_in_the_last_step_ends_a_complete_run_with_0(tmp_path):
    """SIGTERM met at the last step: the final checkpoint is saved and the run ends as finished (exit 0, its summary
    line), not as preempted (75), which would have a scheduler requeue a run that is done."""
    store = write_learnable_store(tmp_path / "store" / "arith")
    cfg = tiny_config(tmp_path, store, train={"train_steps": 4}, checkpoint={"dir": str(tmp_path / "ckpt"),
                                                                            "interval": 0})
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, "4", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "received SIGTERM: saved step 4; that was the last step: the run is complete" in proc.stdout
    assert "done: 4 steps" in proc.stdout
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000004"


ORPHANED_DURING_START_UP = """
import os, sys, time
from pathlib import Path
import torch
from nanotronix.checkpoint.preemption import PreemptionWatcher, torchrun_pid
torchrun_pid()  # what the trainer's main does first
launcher = os.getppid()
Path(sys.argv[1]).touch()  # the stand-in torchrun exits now, while this worker is still starting up
while os.getppid() == launcher:
    time.sleep(0.02)
watcher = PreemptionWatcher(torch.device("cpu"), launcher_pid=torchrun_pid())  # as the Checkpointer, minutes later
print(watcher.stop_requested(), watcher.reason(), flush=True)
"""
STAND_IN_TORCHRUN = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=dict(os.environ, TORCHELASTIC_RUN_ID="t"))
while not os.path.exists(sys.argv[2]):
    time.sleep(0.02)
"""


def test_a_torchrun_gone_during_the_workers_start_up_is_noticed(tmp_path):
    """A worker notes its torchrun when its main starts: one that dies while the workers build the model and check
    the data (minutes at scale) is noticed at the first step, not taken for init (pid 1) as the launcher."""
    out = subprocess.run([sys.executable, "-c", STAND_IN_TORCHRUN, ORPHANED_DURING_START_UP, str(tmp_path / "up")],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                         timeout=120).stdout  # returns when the orphaned worker, which holds the pipe, has printed
    assert out.strip() == "True torchrun, the launcher of a rank, is gone", out
