"""slurm/smollm2_1p7b.sh on a real two-node Slurm cluster (Debian's slurm, two slurmd on this machine, started by
.ci/slurm_cluster.sh).

- A wrong or missing setting (config, data root, token stores, processes vs tp*pp, GPUs) fails the job within
  seconds with one `error:` line, before torchrun starts (~25 s for the seven cases).
- slurm/preprocess.sh as a job array of 3 tasks (~15 s): the folder of shards reads as one store equal to a
  single preprocess run of the same inputs; a task without its settings fails with one line.
- End to end on CPU (~60-90 s): `sbatch --nodes=2 slurm/smollm2_1p7b.sh` with environment overrides pointing at a
  tiny two-stage config and small token stores trains with one process on each node (a torchrun agent per node,
  joined by the c10d rendezvous on the first node), checkpoints, receives USR1
  (`scancel --signal=USR1 --batch`, what `#SBATCH --signal=B:USR1@600` sends before the time limit), saves (the
  log: the trainer's line and one per node, not torchrun's failure report of an exit 75), requeues itself,
  resumes from its checkpoint and finishes; every step's loss, learning rate and data bookkeeping equal those of an
  uninterrupted torchrun of the same config (the reference).
- A failed job step (a trainer process SIGKILLed) requeues the job only if it committed a checkpoint since the
  allocation started (~60 s): without one it ends FAILED with one line saying why (and torchrun's report of the
  killed process); with one it resumes and finishes.
  A job that fails while another run holds CKPT_DIR's lock is not requeued, though `latest` moved (~10 s); nor is one
  submitted with --no-requeue, which says so instead of trying, on USR1 (~20 s) and on a failed step (~10 s).
  A job whose srun is SIGKILLed after a checkpoint requeues once Slurm has stopped the step (~20 s).
  `scontrol requeue` says that Slurm brings the job back, not that it is not requeued (~15 s).
  A job cancelled while it stops on USR1 ends CANCELLED instead of requeueing itself (~15 s); a cancelled job's log
  has one line per node's torchrun, no traceback or TCPStore errors, and says so when the cancel came in the
  preflight (~5 s). A USR1 that came in
  the workers' start-up, before their handler, is repeated until it takes, within seconds (~30 s).

Skips only where Slurm is not installed; .ci/run installs and starts the cluster, so CI never skips.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import TINY_MODEL, torchrun, write_learnable_store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "smollm2_1p7b.sh"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

pytestmark = pytest.mark.skipif(shutil.which("sbatch") is None,
                                reason="Slurm is not installed (sbatch missing); .ci/run installs and starts a "
                                       "two-node cluster with .ci/slurm_cluster.sh")


class Slurm:
    """The test's handle on the cluster: submit, inspect, and cancel whatever is still queued at the end."""

    def __init__(self, conf: str):
        self.env = dict(os.environ, SLURM_CONF=conf)
        for key in list(self.env):  # the test's own environment must not reshape the jobs
            if key.startswith(("SBATCH_", "SLURM_")) and key != "SLURM_CONF":
                del self.env[key]
        self.jobs: list[str] = []

    def cmd(self, *args: str) -> str:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def sbatch(self, cwd: Path, settings: dict[str, str], *flags: str, script: Path = SCRIPT, nodes: int = 1) -> str:
        env = {**self.env, "PYTHON": sys.executable, **settings}  # settings may name another PYTHON
        proc = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}", *flags, str(script)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        job = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def info(self, job: str) -> dict[str, str]:
        text = self.cmd("scontrol", "show", "job", "-o", job)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job: str, timeout: float, until=lambda info: info["JobState"] in ENDED) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info(job)
            if until(info):
                return info
            time.sleep(0.25)
        raise AssertionError(f"job {job} did not get there in {timeout} s: {self.info(job)}")

    def cancel_all(self) -> None:
        for job in self.jobs:
            subprocess.run(["scancel", job], env=self.env, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def slurm():
    start = subprocess.run(["bash", str(ROOT / ".ci" / "slurm_cluster.sh"), "start"], capture_output=True,
                           text=True, timeout=300)
    assert start.returncode == 0, f"could not start the Slurm cluster: {start.stderr}"
    conf = subprocess.run(["bash", str(ROOT / ".ci" / "slurm_cluster.sh"), "conf"], capture_output=True,
                          text=True).stdout.strip()
    cluster = Slurm(conf)
    yield cluster
    cluster.cancel_all()


def seconds(runtime: str) -> int:
    """Slurm's RunTime ([D-]HH:MM:SS) in seconds."""
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return ((int(days) if days else 0) * 24 + h) * 3600 + m * 60 + s


def job_output(cwd: Path, job: str) -> str:
    return (cwd / f"smollm2-1.7b-{job}.out").read_text()


def tiny_two_stage_config(path: Path, train_steps: int, switch_step: int) -> Path:
    """A tiny model on two stores `a` and `b` (relative to data.root), switching mixtures at `switch_step`."""
    cfg = {
        "model": dict(TINY_MODEL),
        "train": {"seq_len": 32, "global_batch_size": 8, "micro_batch_size": 2, "train_steps": train_steps,
                  "seed": 7, "dtype": "float32"},
        "optimizer": {"lr": 3e-3},
        "lr_schedule": {"warmup_steps": 5, "decay_start_step": train_steps - 40, "decay_steps": 40},
        "data": {"stages": [
            {"name": "only_a", "start_step": 1, "datasets": [{"path": "a", "weight": 1.0}]},
            {"name": "a_and_b", "start_step": switch_step,
             "datasets": [{"path": "a", "weight": 0.5}, {"path": "b", "weight": 0.5}]}]},
        "checkpoint": {"interval": 10, "keep_last": 0, "resume": "auto"},
        "logging": {"interval": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------------ preflight

def preflight_cases(tmp: Path) -> list[tuple[str, dict[str, str], tuple[str, ...], str]]:
    store_root = tmp / "stores"
    write_learnable_store(store_root / "a")
    write_learnable_store(store_root / "b", seed=1)
    tiny = tiny_two_stage_config(tmp / "tiny.yaml", 100, 50)
    (tmp / "empty").mkdir()
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


def test_a_config_that_names_a_checkpoint_starts_from_it(slurm, tmp_path):
    """A branch off another run (checkpoint.resume: PATH in the config, as smollm2_1p7b_anneal_math.yaml): the job
    starts from that checkpoint, not from scratch (the script passes auto only when the config names none)."""
    config, stores = two_stage_run(tmp_path, train_steps=60, switch_step=55)
    source = tmp_path / "source"
    proc = torchrun(1, ["-m", "nanotronix.train", "--config", str(config), f"data.root={stores}",
                        "train.train_steps=4", f"checkpoint.dir={source}", f"logging.dir={tmp_path / 'source_logs'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    branch = yaml.safe_load(config.read_text())
    branch["checkpoint"]["resume"] = str(source / "step_0000004")
    branch["train"]["train_steps"] = 6
    (tmp_path / "branch.yaml").write_text(yaml.safe_dump(branch))
    run_dir = tmp_path / "run"
    job = slurm.sbatch(tmp_path, {"CONFIG": str(tmp_path / "branch.yaml"), "DATA_ROOT": str(stores),
                                  "RUN_DIR": str(run_dir), "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "1"})
    info = slurm.wait(job, timeout=400)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, out)
    assert f"resumed from {source / 'step_0000004'}" in out, out
    assert [r["step"] for r in read_records(run_dir / "logs" / "metrics.jsonl")] == [5, 6]


# ------------------------------------------------------------------------------- preprocessing job array

def test_preprocess_job_array_writes_one_store(slurm, tmp_path, tiny_tokenizer):
    from nanotronix.data import PreprocessOptions, open_store, preprocess
    from test_preprocess_shards import write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    tok = tiny_tokenizer
    settings = {"INPUT": str(corpus), "TOKENIZER": tok, "OUTPUT": str(tmp_path / "sharded")}
    job = slurm.sbatch(tmp_path, settings, "--array=0-2", "--cpus-per-task=1",
                       script=ROOT / "slurm" / "preprocess.sh")
    broken = slurm.sbatch(tmp_path, {"TOKENIZER": tok, "OUTPUT": str(tmp_path / "x")}, "--array=0",
                          "--cpus-per-task=1", script=ROOT / "slurm" / "preprocess.sh")
    for task in (f"{job}_0", f"{job}_1", f"{job}_2", f"{broken}_0"):
        info = slurm.wait(task, timeout=400)
        log = (tmp_path / f"preprocess-{task}.out").read_text()
        if task.startswith(broken):
            assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), (info, log)
            assert log.strip().splitlines() == ["error: INPUT is not set (input files or folders)"], log
        else:
            assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, log)
            assert f"shard {task[-1]}/3" in log and "wrote " in log, log

    preprocess(PreprocessOptions([str(corpus)], tok, str(tmp_path / "whole"), progress=False))
    sharded, whole = open_store(tmp_path / "sharded"), open_store(tmp_path / "whole")
    assert sharded.metadata["shards"] == 3 and sharded.num_documents == whole.num_documents
    assert (tmp_path / "whole.bin").read_bytes() == b"".join(
        (tmp_path / "sharded" / f"shard-{i:05d}-of-00003.bin").read_bytes() for i in range(3))


# ------------------------------------------------------------------------------- USR1 -> save -> requeue

TRAIN_STEPS, SWITCH_STEP, SIGNAL_AFTER = 150, 75, 12


def two_stage_run(tmp_path: Path, train_steps: int = TRAIN_STEPS, switch_step: int = SWITCH_STEP
                  ) -> tuple[Path, Path]:
    """The tiny two-stage config (tmp_path/tiny.yaml) and the folder of its two learnable stores, a and b."""
    stores = tmp_path / "stores"
    write_learnable_store(stores / "a")
    write_learnable_store(stores / "b", seed=1)
    return tiny_two_stage_config(tmp_path / "tiny.yaml", train_steps, switch_step), stores


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def release(slurm: Slurm, job: str) -> None:
    """Start a requeued job now instead of after Slurm's ~2 min hold, once the nodes have finished its first run: a
    launch within the same second as the requeue fails with "Job credential revoked" (what the hold avoids)."""
    deadline = time.monotonic() + 180
    while set(slurm.cmd("sinfo", "-h", "-N", "-o", "%t").split()) != {"idle"}:
        assert time.monotonic() < deadline, slurm.cmd("sinfo", "-N")
        time.sleep(0.25)
    time.sleep(2)
    slurm.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")


def ended_without_restart(slurm: Slurm, job: str, cwd: Path) -> tuple[dict, str]:
    """(scontrol's fields, the job's log) once the batch shell has said its last word and a requeue, had there been
    one, would be in."""
    deadline = time.monotonic() + 300
    while "job step ended (exit" not in job_output(cwd, job):
        assert time.monotonic() < deadline, job_output(cwd, job)
        time.sleep(0.5)
    # then until Slurm has settled it: COMPLETING while its processes stop (seconds, under load), else a requeue
    slurm.wait(job, 120, until=lambda i: i["JobState"] in ENDED | {"PENDING", "REQUEUED"})
    time.sleep(2)
    return slurm.info(job), job_output(cwd, job)


def wait_for_step(slurm: Slurm, job: str, cwd: Path, metrics: Path, step: int) -> None:
    deadline = time.monotonic() + 400
    while not (metrics.is_file() and any(r["step"] >= step for r in read_records(metrics))):
        state = slurm.info(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, job_output(cwd, job))
        assert time.monotonic() < deadline, "no training progress within 400 s"
        time.sleep(0.1)


def test_usr1_saves_requeues_resumes_and_continues_the_same_run(slurm, tmp_path):
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    metrics = run_dir / "logs" / "metrics.jsonl"

    # Interval saves in the background, as the SmolLM2 recipes make them; the save on USR1 is blocking.
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "RUN_DIR": str(run_dir),
                                  "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "1",
                                  "OVERRIDES": "checkpoint.async_save=true"}, nodes=2)
    nodes = slurm.cmd("scontrol", "show", "hostnames", slurm.wait(job, 60, lambda i: i.get("NodeList", "") not in ("", "(null)"))[
        "NodeList"]).split()
    assert len(nodes) == 2, nodes  # two nodes, one process each (world size 2, as the reference below)
    # Train until the first interval checkpoint (step 10) is behind us, then preempt.
    wait_for_step(slurm, job, tmp_path, metrics, SIGNAL_AFTER)
    slurm.cmd("scancel", "--signal=USR1", "--batch", job)

    # The job saves, requeues itself and waits in the queue (Slurm holds a requeued job ~2 min): release it.
    info = slurm.wait(job, timeout=300, until=lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING"
                      or i["JobState"] in ENDED)
    assert info["JobState"] == "PENDING", (info, job_output(tmp_path, job))
    preempted_at = max(r["step"] for r in read_records(metrics))
    assert SIGNAL_AFTER <= preempted_at < TRAIN_STEPS, "the run ended before the signal could stop it"
    release(slurm, job)
    info = slurm.wait(job, timeout=600)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (info, out)
    assert "USR1: asking the trainer to save" in out and f"requeueing job {job}" in out, out
    # A planned stop reads as one: the trainer's line, one line per node's torchrun, the requeue; not torchrun's
    # failure report (a traceback and a failure table per node) of a worker exit 75 (nanotronix.launch)
    assert "saved step" in out and "stopping (exit 75: a scheduler may requeue the job" in out, out
    assert out.count(" worker(s) stopped as planned (exit 75; ") == 2, out
    assert all(f"torchrun on {node}: its 1 worker(s) stopped as planned" in out for node in nodes), out
    assert f"job step ended (exit 75) after USR1: requeueing job {job}" in out, out
    assert "Traceback" not in out and "ChildFailedError" not in out and "failed (exitcode" not in out, out
    assert "restart 0:" in out and "restart 1:" in out and "job step ended with exit code 0" in out, out
    assert out.count("2 node(s) [") == 2 and "x 1 process(es) on cpu" in out, out  # both allocations

    # Checkpoints: every interval step before the signal, plus the one written on USR1.
    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")}
    assert {"step_0000010", f"step_{preempted_at:07d}", f"step_{TRAIN_STEPS:07d}"} <= ckpts, ckpts
    saved_config = json.loads((run_dir / "checkpoints" / "step_0000010" / "checkpoint.json").read_text())["config"]
    assert saved_config["checkpoint"]["async_save"] is True

    # The log: steps 1..N once each; the second allocation started right after the saved step.
    records = read_records(metrics)
    steps = [r["step"] for r in records]
    assert steps == list(range(1, TRAIN_STEPS + 1)), steps
    gaps = [b["time"] - a["time"] for a, b in zip(records, records[1:])]
    assert max(range(len(gaps)), key=gaps.__getitem__) + 1 == preempted_at  # the requeue is the longest pause

    # The reference: the same config, uninterrupted, with plain torchrun.
    ref_dir = tmp_path / "reference"
    proc = torchrun(2, ["-m", "nanotronix.train", "--config", str(config), f"data.root={stores}",
                        f"checkpoint.dir={ref_dir / 'checkpoints'}", f"logging.dir={ref_dir / 'logs'}",
                        "train.device=cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = read_records(ref_dir / "logs" / "metrics.jsonl")
    assert [r["step"] for r in reference] == steps
    for got, want in zip(records, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), got["step"]
        assert (got["lr"], got["stage"], got["consumed_tokens"], got["datasets"]) == (
            want["lr"], want["stage"], want["consumed_tokens"], want["datasets"]), got["step"]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # and it learned

    # What a user looks at afterwards: the plot marks the stage switch.
    plot = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_run.py"), str(run_dir / "logs")],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0 and f"a_and_b at step {SWITCH_STEP}" in plot.stdout, plot.stderr


def test_a_usr1_in_the_workers_start_up_is_repeated_within_seconds(slurm, tmp_path):
    """A USR1 that reaches the workers before the trainer installed its handler is ignored (they start with USR1
    ignored: slurm/common.sh says why); the script repeats it every 10 s until it takes. Before, every 60 s: most of a
    short --signal lead. The workers' start-up is held 5 s here (a sitecustomize on PYTHONPATH), the USR1 sent in it;
    the run is long enough never to end by itself (~30 s)."""
    config, stores = two_stage_run(tmp_path)
    started = tmp_path / "a_worker_started"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os, time\n"
        "if 'TORCHELASTIC_RUN_ID' in os.environ and 'LOCAL_RANK' in os.environ:  # a worker of torchrun\n"
        f"    open({str(started)!r}, 'w').close()\n"
        "    time.sleep(5)\n")
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                  "NPROC_PER_NODE": "1", "RUN_DIR": str(tmp_path / "run"),
                                  "OVERRIDES": "train.train_steps=100000", "PYTHONPATH": str(tmp_path / "site")})
    deadline = time.monotonic() + 300
    while not started.is_file():
        assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, job_output(tmp_path, job)
        time.sleep(0.1)
    slurm.cmd("scancel", "--signal=USR1", "--batch", job)
    # within two repeats and the stop (a repeat every 60 s would take a minute)
    info = slurm.wait(job, timeout=40, until=lambda i: i["JobState"] in ENDED or i["Restarts"] != "0")
    out = job_output(tmp_path, job)
    slurm.cmd("scancel", job)
    assert info["Restarts"] == "1", (info, out)
    assert "checkpoint: received SIGUSR1: saved step " in out and f"requeueing job {job}" in out, out


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
    info = slurm.wait(job, timeout=300, until=lambda i: i["JobState"] in ENDED or i["Restarts"] != "0")
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


def test_scancel_ends_the_job_without_a_requeue(slurm, tmp_path):
    """scancel (SIGTERM): the trainer saves the step it is on and the job ends CANCELLED. Before, that save looked
    like progress to the failed-step requeue, and the cancelled job came back (Restarts=1, PENDING)."""
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                  "NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir)})
    wait_for_step(slurm, job, tmp_path, run_dir / "logs" / "metrics.jsonl", 5)
    slurm.cmd("scancel", job)
    info, out = ended_without_restart(slurm, job, tmp_path)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), (info, out)
    assert "after TERM (scancel or the time limit): not requeued" in out and "requeueing job" not in out, out
    # each node's torchrun says the stop in one line (nanotronix.launch), and the rendezvous store outlives the TERM
    assert "Traceback" not in out and "stopped by SIGTERM; its 1 worker(s) stopped as planned" in out, out
    assert "TCPStore" not in out and "frame #" not in out, out
    assert (run_dir / "checkpoints" / "latest").is_file()  # the step it was on, saved


def test_scontrol_requeue_says_the_job_comes_back(slurm, tmp_path):
    """`scontrol requeue` (or a preemption in REQUEUE mode) TERMs the job as scancel does, but Slurm brings it back
    by itself: the log says so (before: "will not be requeued ... resubmit the job", which would make a second job
    of the same run) (~15 s)."""
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                  "NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir)})
    wait_for_step(slurm, job, tmp_path, run_dir / "logs" / "metrics.jsonl", 3)
    slurm.cmd("scontrol", "requeue", job)
    info = slurm.wait(job, timeout=300, until=lambda i: i["JobState"] in ENDED or
                      (i["Restarts"] == "1" and i["JobState"] == "PENDING"))
    out = job_output(tmp_path, job)
    slurm.cmd("scancel", job)
    assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), (info, out)
    assert "TERM: Slurm is requeueing the job (scontrol requeue or a preemption)" in out, out
    assert "after TERM: Slurm requeues the job, which resumes from step " in out, out
    assert "not be requeued" not in out and "resubmit" not in out, out


def test_scancel_while_stopping_on_usr1_ends_the_job(slurm, tmp_path):
    """scancel right after a USR1, while the trainer saves and stops: the job ends CANCELLED. Before, the USR1 path
    requeued it all the same (its TERM line said it would not), and the cancelled job came back (~15 s)."""
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                  "NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir)})
    wait_for_step(slurm, job, tmp_path, run_dir / "logs" / "metrics.jsonl", 3)
    slurm.cmd("scancel", "--signal=USR1", "--batch", job)
    slurm.cmd("scancel", job)
    info, out = ended_without_restart(slurm, job, tmp_path)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), (info, out)
    assert "after USR1, then TERM (scancel): not requeued" in out and "requeueing job" not in out, out
    # each node's torchrun says the stop in one line (nanotronix.launch), and the rendezvous store outlives the TERM
    assert "Traceback" not in out and "stopped by SIGTERM; its 1 worker(s) stopped as planned" in out, out
    assert "TCPStore" not in out and "frame #" not in out, out


def submit_with_a_slow_preflight(slurm: Slurm, tmp_path: Path, *flags: str, hold_s: int = 8, then: str = "") -> str:
    """A training job of the tiny two-stage config whose launch preflight takes `hold_s` s more (a PYTHON wrapper), as
    in a large job's start: a USR1 sent once the log says the allocation started (`wait_for_restart`) lands in it.
    `then`: shell commands the wrapper runs in the preflight's job step once the preflight itself has succeeded."""
    config, stores = two_stage_run(tmp_path)
    wrapper = tmp_path / "python"
    preflight = f'{sys.executable} "$@" || exit; {then}; exit 0' if then else f'exec {sys.executable} "$@"'
    wrapper.write_text(f'#!/bin/bash\ncase " $* " in *" nanotronix.preflight "*) sleep {hold_s}; {preflight} ;; esac\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                   "NPROC_PER_NODE": "1", "RUN_DIR": str(tmp_path / "run"), "PYTHON": str(wrapper)},
                        *flags)


def wait_for_restart(slurm: Slurm, tmp_path: Path, job: str, restart: int) -> None:
    """Until the job's log says its allocation number `restart` started."""
    out_file, deadline = tmp_path / f"smollm2-1.7b-{job}.out", time.monotonic() + 300
    while not (out_file.is_file() and f" restart {restart}: " in out_file.read_text()):
        assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, job_output(tmp_path, job)
        time.sleep(0.25)


def test_scancel_during_the_preflight_says_nothing_was_started(slurm, tmp_path):
    """scancel while the preflight runs (slowed down as above): Slurm stops its step too; the log says that training
    was not started, instead of nothing after the TERM line (~15 s)."""
    job = submit_with_a_slow_preflight(slurm, tmp_path)
    wait_for_restart(slurm, tmp_path, job, 0)
    slurm.cmd("scancel", job)
    info = slurm.wait(job, timeout=300)
    deadline = time.monotonic() + 30  # the batch shell's last line, once Slurm shows the job ended
    while "training was not started" not in job_output(tmp_path, job) and time.monotonic() < deadline:
        time.sleep(0.25)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), (info, out)
    assert "TERM: waiting for the job step to stop (the job will not be requeued)" in out, out
    assert "the TERM came during the preflight: training was not started (nothing was saved)" in out, out
    assert "launching on every node" not in out and not any(line.startswith("error") for line in out.splitlines()), out


def test_usr1_in_a_job_submitted_with_no_requeue_says_it_is_not_requeued(slurm, tmp_path):
    """`sbatch --no-requeue`: Slurm refuses `scontrol requeue`. The log said "requeueing job" and then that scontrol
    failed; it now says at the USR1, and at the end, that the job is not requeued and why (~20 s: the preflight is
    slowed down, as in the test above, so that the USR1 lands in it)."""
    job = submit_with_a_slow_preflight(slurm, tmp_path, "--no-requeue")
    wait_for_restart(slurm, tmp_path, job, 0)
    slurm.cmd("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait(job, timeout=600)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), (info, out)
    assert ("USR1: asking the trainer to save a checkpoint and stop (it will not requeue itself: the job was "
            "submitted with --no-requeue)") in out, out
    assert ("USR1 before training started: not requeued: the job was submitted with --no-requeue; resubmit it to "
            f"continue from the latest checkpoint in {tmp_path / 'run' / 'checkpoints'}") in out, out
    assert "requeueing" not in out and "scontrol requeue failed" not in out, out


def test_a_failed_step_in_a_job_submitted_with_no_requeue_says_it_is_not_requeued(slurm, tmp_path):
    """`sbatch --no-requeue`, a step that fails after committing a checkpoint: the log says why the job is not
    requeued (Slurm would refuse `scontrol requeue`) and how to continue, and Slurm shows no restart (~15 s)."""
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest"
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                  "NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir), "OVERRIDES": "checkpoint.interval=2"},
                       "--no-requeue")
    deadline = time.monotonic() + 300
    while not latest.is_file():  # a checkpoint committed: progress, which a requeueable job would requeue on
        assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, job_output(tmp_path, job)
        time.sleep(0.1)
    kill_worker(run_dir, 0)
    info = slurm.wait(job, timeout=300)
    out = job_output(tmp_path, job)
    reached = max(int(p.name[5:]) for p in latest.parent.glob("step_*") if (p / "checkpoint.json").is_file())
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "0"), (info, out)
    assert (f"job step failed (exit 1) after committing the checkpoint of step {reached}: not requeued: the job was "
            "submitted with --no-requeue; resubmit it to continue from that checkpoint") in out, out
    assert "requeueing" not in out and "scontrol requeue failed" not in out, out


def test_startup_failures_outside_the_preflight_are_one_line(slurm, tmp_path):
    """The rendezvous port already taken on the first node, and a RUN_DIR that cannot be created: one `error:` line
    each (before: "error: error: rendezvous store: ...", and mkdir's own line above a reasonless one). The first line
    of the log says where the checkpoints and the metrics go."""
    import socket
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    port = busy.getsockname()[1]
    (tmp_path / "a_file").write_text("")
    cases = [({"MASTER_PORT": str(port), "RUN_DIR": str(tmp_path / "run"), "CKPT_DIR": str(tmp_path / "ckpt")},
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
                assert f"(checkpoints {tmp_path / 'ckpt'}, metrics {tmp_path / 'run' / 'logs'}, this job's logs " in out
                assert "] note: data: a is read 2.02 times over by step 150 " in out, out  # the preflight's, a log line
            else:
                assert lines[0].endswith(": Not a directory"), out
    finally:
        busy.close()
