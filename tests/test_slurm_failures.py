"""slurm/smollm2_1p7b.sh's bad settings and failures, on the real local Slurm cluster (the cluster, the job handle and
the helpers: slurm_helpers.py).

- A wrong or missing setting (config, data root, token stores, processes vs tp*pp, GPUs, port, OVERRIDES, a PYTHON
  without the project's packages) fails the job within seconds with one `error:` line, before torchrun starts (the
  thirteen cases here, a few seconds each); so do a taken rendezvous port and a RUN_DIR that cannot be created,
  outside the preflight.
- A failed job step (a trainer process SIGKILLed) requeues the job only if it committed a checkpoint since the
  allocation started (~60 s): without one it ends FAILED with one line saying why (and torchrun's report of the
  killed process); with one it resumes and finishes.
  A job that fails while another run holds CKPT_DIR's lock is not requeued, though `latest` moved (~10 s); nor is one
  submitted with --no-requeue, which says so instead of trying (~10 s).
  A job whose srun is SIGKILLed after a checkpoint requeues once Slurm has stopped the step (~20 s).

Skips only where Slurm is not installed; .ci/run installs and starts the cluster, so CI never skips.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest

from helpers import write_learnable_store
from slurm_helpers import (ENDED, ROOT, SCRIPT, SIGNAL_AFTER, TRAIN_STEPS, job_output, read_records, release,
                           requires_slurm, tiny_two_stage_config, two_stage_run, wait_for_step)

pytestmark = requires_slurm


def seconds(runtime: str) -> int:
    """Slurm's RunTime ([D-]HH:MM:SS) in seconds."""
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return ((int(days) if days else 0) * 24 + h) * 3600 + m * 60 + s


# ------------------------------------------------------------------------------------------------ preflight


def preflight_cases(tmp: Path) -> list[tuple[str, dict[str, str], tuple[str, ...], str]]:
    store_root = tmp / "stores"
    write_learnable_store(store_root / "a")
    write_learnable_store(store_root / "b", seed=1)
    tiny = tiny_two_stage_config(tmp / "tiny.yaml", 100, 50)
    (tmp / "empty").mkdir()
    wrong_python = tmp / "python"  # a Python without the project's packages (the system python3 on a cluster)
    wrong_python.write_text(f'#!/bin/bash\nexec {shlex.quote(sys.executable)} -S "$@"\n')
    wrong_python.chmod(0o755)
    # the preflight killed before it says anything (the OOM killer, a crash while torch imports), the store started
    killed_python = tmp / "killed_python"
    killed_python.write_text('#!/bin/bash\ncase " $* " in *" nanotronix.preflight "*) kill -KILL $$ ;; esac\n'
                             f'exec {shlex.quote(sys.executable)} "$@"\n')
    killed_python.chmod(0o755)
    return [
        ("no config", {"CONFIG": str(tmp / "missing.yaml")}, (),
         f"error: CONFIG={tmp / 'missing.yaml'}: no such file"),
        ("data root missing", {"DATA_ROOT": str(tmp / "nodata"), "GPUS_PER_NODE": "0"}, (),
         f"error: DATA_ROOT={tmp / 'nodata'}: no such directory"),
        ("token store missing", {"DATA_ROOT": str(tmp / "empty"), "GPUS_PER_NODE": "0"}, (),
         f"error: token store not found: {tmp / 'empty' / 'fineweb-edu'}"),
        ("fewer processes than tp*pp", {"CONFIG": str(tiny), "DATA_ROOT": str(store_root), "GPUS_PER_NODE": "0",
                                        "NPROC_PER_NODE": "2", "OVERRIDES": "parallel.tp=2\n  parallel.pp=2\n"}, (),
         "error: parallel: tp*pp = 2*2 = 4 needs at least 4 processes, the job has 2 (1 node(s) x 2 per node)"),
        # GPUS_PER_NODE=8 (the default), but this CPU build of torch sees no GPU in the job step
        ("GPUs but no CUDA", {"DATA_ROOT": str(store_root)}, (),
         "error: train.device: cuda, but no CUDA GPU is visible on this node (CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7)"),
        ("no GPUs in the allocation", {"SBATCH_GRES": "none"}, (),
         "error: train.device: cuda, but no CUDA GPU is visible on this node (CUDA_VISIBLE_DEVICES=unset)"),
        ("more processes than GPUs", {"NPROC_PER_NODE": "9"}, (),
         "error: NPROC_PER_NODE=9 is more than GPUS_PER_NODE=8"),
        ("a port out of range", {"MASTER_PORT": "99999"}, (), "error: MASTER_PORT=99999 is not a TCP port (1-65535)"),
        # the script reads CKPT_DIR to decide about requeueing: checkpoints elsewhere would look like no progress
        # (one override per line, as OVERRIDES=$(cat file) gives: every line counts, not only the first)
        ("checkpoint.dir in OVERRIDES", {"OVERRIDES": f"\ntrain.seed=3\ncheckpoint.dir={tmp / 'elsewhere'}"}, (),
         "error: OVERRIDES sets checkpoint.dir: set CKPT_DIR instead"),
        # every allocation after the first would find the run's own checkpoints in CKPT_DIR and be refused
        ("checkpoint.resume=none in OVERRIDES", {"OVERRIDES": "train.seed=3 checkpoint.resume=none"}, (),
         "error: OVERRIDES sets checkpoint.resume=none: a requeued job would refuse its own checkpoints in CKPT_DIR"),
        ("the checkpoint section in OVERRIDES", {"OVERRIDES": 'checkpoint={"dir":"/tmp/x","interval":5}'}, (),
         "error: OVERRIDES replaces the whole checkpoint section (and its folder): set its keys one by one"),
        ("a list with a space in OVERRIDES", {"OVERRIDES": "train.seed=3 validation.data=[a, b]"}, (),
         "error: OVERRIDES: 'b]' is not dotted.key=value (OVERRIDES is split at spaces and newlines"),
        # the preflight says it, where its ModuleNotFoundError traceback was the job's error
        ("a Python without the project's packages", {"PYTHON": str(wrong_python), "GPUS_PER_NODE": "0"}, (),
         f"error: the Python at {sys.executable} lacks `torch`, `numpy`, `pyyaml`"),
        # srun's note is the reason (it was filtered out with srun's other lines, which left no line at all)
        ("the preflight killed", {"PYTHON": str(killed_python), "GPUS_PER_NODE": "0"}, (),
         f"error: the preflight ({killed_python} -m nanotronix.preflight) failed without a message (exit 137: "),
    ]


def test_bad_settings_fail_in_seconds_with_one_line(slurm, tmp_path):
    for name, settings, flags, message in preflight_cases(tmp_path):
        job = slurm.sbatch(tmp_path, settings, *flags)
        info = slurm.wait(job, timeout=600)
        out = job_output(tmp_path, job)
        errors = [line for line in out.splitlines() if line.startswith("error")]
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), (name, info, out)
        assert len(errors) == 1 and errors[0].startswith(message), (name, out)
        assert "rendezvous" not in out and "nanotronix:" not in out, (name, out)  # torchrun never started
        assert not [line for line in out.splitlines() if line.startswith("srun:")], (name, out)
        assert seconds(info["RunTime"]) <= 45, (name, info["RunTime"])  # 1-5 s alone; slack for a busy machine
    # a checkout whose path has a space, submitted from elsewhere: found from the submitted script's path
    (tmp_path / "my checkout").symlink_to(ROOT)
    (tmp_path / "elsewhere").mkdir()
    job = slurm.sbatch(tmp_path / "elsewhere", {"CONFIG": str(tmp_path / "missing.yaml")},
                       script=tmp_path / "my checkout" / SCRIPT.relative_to(ROOT))
    slurm.wait(job, timeout=300)
    errors = [line for line in job_output(tmp_path / "elsewhere", job).splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: CONFIG={tmp_path / 'missing.yaml'}: no such file"), \
        errors


def test_startup_failures_outside_the_preflight_are_one_line(slurm, tmp_path):
    """The rendezvous port already taken on the first node, and a RUN_DIR that cannot be created: one `error:` line
    each (before: "error: error: rendezvous store: ...", and mkdir's own line above a reasonless one). The first line
    of the log says where the checkpoints and the metrics go, a leading `~` in their folders expanded."""
    import socket
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    port = busy.getsockname()[1]
    (tmp_path / "a_file").write_text("")
    # RUN_DIR, CKPT_DIR and LOG_DIR with a `~` that reached the job unexpanded (--export=ALL,RUN_DIR=~/run):
    # expanded as the trainer expands them, not a literal `~` folder in the submit directory beside the trainer's
    # checkpoints
    cases = [({"MASTER_PORT": str(port), "HOME": str(tmp_path), "RUN_DIR": "~/run", "CKPT_DIR": "~/ckpt",
               "LOG_DIR": "~/metrics"},
              f"error: rendezvous store: cannot listen on port {port}"),
             ({"RUN_DIR": str(tmp_path / "a_file" / "run")},
              f"error: cannot create {tmp_path / 'a_file' / 'run' / 'slurm'}/job-")]
    config, stores = two_stage_run(tmp_path)
    try:
        for settings, message in cases:
            job = slurm.sbatch(tmp_path, dict(settings, CONFIG=str(config), DATA_ROOT=str(stores), GPUS_PER_NODE="0",
                                              NPROC_PER_NODE="1"))
            info = slurm.wait(job, timeout=600)
            out = job_output(tmp_path, job)
            lines = [line for line in out.splitlines() if not line.startswith("[nanotronix-slurm")]
            assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), (info, out)
            assert len(lines) == 1 and lines[0].startswith(message), out
            if "MASTER_PORT" in settings:
                assert f"(checkpoints {tmp_path / 'ckpt'}, metrics {tmp_path / 'metrics'}, this job's logs " in out
                assert "] note: data: a is read 2.02 times over by step 150 " in out, out  # the preflight's, a log line
                assert [p.name for p in (tmp_path / "run" / "slurm").iterdir()] == [f"job-{job}-restart-0"]
                assert not (tmp_path / "~").exists()
            else:
                assert lines[0].endswith(": Not a directory"), out
    finally:
        busy.close()


# ------------------------------------------------------------------- a failed job step -> requeue if it progressed


def kill_worker(run_dir: Path, rank: int) -> None:
    """SIGKILL the trainer process of `rank` of the job training into `run_dir` (as a lost GPU or the OOM killer
    would end it); torchrun then stops the other workers and the job step fails."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if (b"nanotronix.train" in cmd and b"nanotronix.launch" not in cmd and str(run_dir).encode() in cmd
                and f"\0RANK={rank}\0".encode() in env):
            os.kill(int(pid), signal.SIGKILL)
            return
    raise AssertionError(f"no trainer process of rank {rank} training into {run_dir}")


def test_a_failed_step_requeues_only_after_committing_a_checkpoint(slurm, tmp_path):
    config, stores = two_stage_run(tmp_path)
    settings = {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2"}

    # Without a checkpoint since it started (only the last step saves): the failure would recur, no requeue.
    run_dir = tmp_path / "no_progress"
    job = slurm.sbatch(tmp_path, dict(settings, RUN_DIR=str(run_dir), OVERRIDES="checkpoint.interval=0"))
    wait_for_step(slurm, job, tmp_path, run_dir / "logs" / "metrics.jsonl", 5)
    kill_worker(run_dir, 1)
    info = slurm.wait(job, timeout=600)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), (info, out)
    assert "job step failed (exit 1) without committing a checkpoint after step 0: not requeued" in out, out
    # a real failure keeps torchrun's report (nanotronix.launch shortens only a planned stop's)
    assert "ChildFailedError" in out and "Signal 9 (SIGKILL) received by PID" in out, out
    assert "stopped as planned" not in out, out

    # After the checkpoint of step 10: requeued, resumed from it, finished. On two nodes, one process each: the
    # killed rank's torchrun ends its node's task, and the other node's rank must stop too (the rendezvous orders
    # ranks by arrival, so rank 1 is on either node).
    run_dir = tmp_path / "progress"
    metrics = run_dir / "logs" / "metrics.jsonl"
    job = slurm.sbatch(tmp_path, dict(settings, RUN_DIR=str(run_dir), NPROC_PER_NODE="1"), nodes=2)
    wait_for_step(slurm, job, tmp_path, metrics, SIGNAL_AFTER)
    kill_worker(run_dir, 1)
    info = slurm.wait(job, timeout=300, until=lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING"
                      or i["JobState"] in ENDED)
    assert info["JobState"] == "PENDING", (info, job_output(tmp_path, job))
    failed_at = max(r["step"] for r in read_records(metrics))
    reached = (run_dir / "checkpoints" / "latest").read_text().strip()
    release(slurm, job)
    info = slurm.wait(job, timeout=600)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (info, out)
    assert (f"job step failed (exit 1) after committing the checkpoint of step {int(reached[5:])} (this allocation "
            f"started from step 0): requeueing job {job}") in out, out
    assert f"resumed from {run_dir / 'checkpoints' / reached}" in out, out
    # The rendezvous store is the job's (nanotronix/rendezvous_store.py), not an agent's: the failed node's agent
    # does not take it down with it, so the other agent stops without TCPStore errors and stack dumps
    assert "TCPStore" not in out and "keep-alive heartbeat" not in out and "frame #" not in out, out
    steps = [r["step"] for r in read_records(metrics)]
    assert sorted(set(steps)) == list(range(1, TRAIN_STEPS + 1)) and SIGNAL_AFTER <= failed_at < TRAIN_STEPS


def test_srun_killed_after_a_checkpoint_requeues_the_job(slurm, tmp_path):
    """The batch script's `srun` SIGKILLed (the OOM killer, a user) after a checkpoint: srun ends at once, and Slurm
    cancels its job step, whose trainers stop seconds later. Before, the script read CKPT_DIR's lock meanwhile,
    found it held by the step's own rank 0, took that for another run's and did not requeue (~25 s)."""
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                  "NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir), "OVERRIDES": "checkpoint.interval=2"})
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "latest").is_file():
        assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, job_output(tmp_path, job)
        time.sleep(0.1)
    sruns = {pid: argv for pid, argv in processes(run_dir) if os.path.basename(argv[0]) == b"srun"
             and b"nanotronix.launch" in argv}
    launcher = next(pid for pid in sruns if parent_of(pid) not in sruns)  # srun forks a helper srun
    os.kill(launcher, signal.SIGKILL)
    # (PENDING once the old allocation's COMPLETING is over: Restarts counts up before that)
    info = slurm.wait(job, timeout=300, until=lambda i: i["JobState"] in ENDED or
                      (i["Restarts"] != "0" and i["JobState"] == "PENDING"))
    out = job_output(tmp_path, job)
    slurm.cmd("scancel", job)
    assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), (info, out)
    assert "after committing the checkpoint of step" in out and f"requeueing job {job}" in out, out
    assert "another run holds" not in out, out


def processes(run_dir: Path) -> list[tuple[int, list[bytes]]]:
    """(pid, argv) of the processes whose command line names `run_dir`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(run_dir).encode() in arg for arg in argv):
            found.append((int(pid), argv))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("usr1", [False, True], ids=["failed", "usr1"])
def test_a_job_refused_by_another_runs_lock_is_not_requeued(slurm, tmp_path, usr1):
    """A job submitted twice: the second's trainer waits for the first's lock on CKPT_DIR. When it fails there,
    `latest` has moved on (the first run's checkpoints), which is no progress of its own: it must not requeue
    (before, it did, over and over). The test process holds the lock and moves `latest` as the first run would.
    Likewise when a USR1 (the time limit's notice, a preemption) came while it waited: before, the USR1 path
    requeued it without asking, and the requeued job waited for the lock and was refused again."""
    import fcntl
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with open(run_dir / "checkpoints" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("host first-job pid 1\n")
        lock.flush()
        job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                      "NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir)})
        out_file, deadline = tmp_path / f"smollm2-1.7b-{job}.out", time.monotonic() + 300
        while not (out_file.is_file() and "is held by host first-job pid 1: waiting" in out_file.read_text()):
            assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, job_output(tmp_path, job)
            time.sleep(0.25)
        if usr1:
            slurm.cmd("scancel", "--signal=USR1", "--batch", job)
            while "USR1: asking the trainer" not in job_output(tmp_path, job):
                assert time.monotonic() < deadline, job_output(tmp_path, job)
                time.sleep(0.25)
        (run_dir / "checkpoints" / "latest").write_text("step_0000020\n")  # the first run's progress
        kill_worker(run_dir, 0)
        info = slurm.wait(job, timeout=300, until=lambda i: i["JobState"] in ENDED or i["Restarts"] != "0")
        out = job_output(tmp_path, job)
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), (info, out)
    assert (f"{'job step ended (exit 1) after USR1' if usr1 else 'job step failed (exit 1)'} while another run holds "
            f"{run_dir / 'checkpoints' / '.lock'} (host first-job pid 1): not requeued") in out, out
    assert "requeueing job" not in out, out


@pytest.mark.parametrize("how", ["--no-requeue", "REQUEUE_ON_FAILURE=0"])
def test_a_failed_step_in_a_job_submitted_with_no_requeue_says_it_is_not_requeued(slurm, tmp_path, how):
    """`sbatch --no-requeue` (or the script's REQUEUE_ON_FAILURE=0), a step that fails after committing a
    checkpoint: the log says why the job is not requeued (Slurm would refuse `scontrol requeue`) and how to continue,
    and Slurm shows no restart (~15 s each)."""
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest"
    settings = {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "1",
                "RUN_DIR": str(run_dir), "OVERRIDES": "checkpoint.interval=2"}
    if how.startswith("--"):
        job = slurm.sbatch(tmp_path, settings, how)
    else:
        job = slurm.sbatch(tmp_path, dict(settings, REQUEUE_ON_FAILURE="0"))
    deadline = time.monotonic() + 300
    while not latest.is_file():  # a checkpoint committed: progress, which a requeueable job would requeue on
        assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, job_output(tmp_path, job)
        time.sleep(0.1)
    kill_worker(run_dir, 0)
    info = slurm.wait(job, timeout=300)
    out = job_output(tmp_path, job)
    reached = max(int(p.name[5:]) for p in latest.parent.glob("step_*") if (p / "checkpoint.json").is_file())
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "0"), (info, out)
    said = {"--no-requeue": f"job step failed (exit 1) after committing the checkpoint of step {reached}: not "
                            "requeued: the job was submitted with --no-requeue; resubmit it to continue from that "
                            "checkpoint",
            "REQUEUE_ON_FAILURE=0": f"job step failed (exit 1): not requeued (REQUEUE_ON_FAILURE=0); the latest "
                                    f"checkpoint is step {reached}: resubmit the job to continue from it"}
    assert said[how] in out, out
    assert "requeueing" not in out and "scontrol requeue failed" not in out, out
