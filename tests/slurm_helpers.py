"""What the Slurm test files share (test_slurm*.py): a handle on the local two-node cluster (.ci/slurm_cluster.sh;
the `slurm` fixture in conftest.py starts it and makes one per test module), the skip without Slurm, the jobs' logs,
the tiny two-stage training config, and the waits on a job's progress and state."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import TINY_MODEL, write_learnable_store

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "smollm2_1p7b.sh"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# each Slurm test module's `pytestmark`
requires_slurm = pytest.mark.skipif(shutil.which("sbatch") is None,
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


def common_sh_functions(*names: str) -> str:
    """The named shell functions of slurm/common.sh, as written there (one-line or multi-line definitions)."""
    text = (SCRIPT.parent / "common.sh").read_text()
    return "\n".join(re.search(rf"^{name}\(\) {{(\n.*?^}}| [^\n]*}})$", text, re.S | re.M).group(0) for name in names)


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


# two_stage_run's length and stage switch, and the step after which a test preempts or fails it (the first interval
# checkpoint, step 10, behind it)
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


def wait_for_step(slurm: Slurm, job: str, cwd: Path, metrics: Path, step: int) -> None:
    deadline = time.monotonic() + 400
    while not (metrics.is_file() and any(r["step"] >= step for r in read_records(metrics))):
        state = slurm.info(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, job_output(cwd, job))
        assert time.monotonic() < deadline, "no training progress within 400 s"
        time.sleep(0.1)


def submit_with_a_slow_preflight(slurm: Slurm, tmp_path: Path, *flags: str, hold_s: int = 8, then: str = "") -> str:
    """A training job of the tiny two-stage config whose launch preflight takes `hold_s` s more (a PYTHON wrapper), as
    in a large job's start: a USR1 sent once the log says the allocation started (`wait_for_restart`) lands in it.
    `then`: shell commands the wrapper runs in the preflight's job step once the preflight itself has succeeded."""
    config, stores = two_stage_run(tmp_path)
    wrapper = tmp_path / "python"
    python = shlex.quote(sys.executable)  # shell text: a Python under a path with spaces stays one word
    preflight = f'{python} "$@" || exit; {then}; exit 0' if then else f'exec {python} "$@"'
    started = tmp_path / PREFLIGHT_STARTED
    wrapper.write_text(f'#!/bin/bash\ncase " $* " in *" nanotronix.preflight "*) touch "{started}"; sleep {hold_s}; '
                       f'{preflight} ;; esac\nexec {python} "$@"\n')
    wrapper.chmod(0o755)
    return slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                   "NPROC_PER_NODE": "1", "RUN_DIR": str(tmp_path / "run"), "PYTHON": str(wrapper)},
                        *flags)


PREFLIGHT_STARTED = "preflight_started"  # made by submit_with_a_slow_preflight's wrapper as the preflight starts


def wait_for_preflight(slurm: Slurm, tmp_path: Path, job: str) -> None:
    """Until the slowed preflight of `submit_with_a_slow_preflight` runs: the script's signal handlers are in place
    then (the log's "restart N:" line comes before them)."""
    deadline = time.monotonic() + 300
    while not (tmp_path / PREFLIGHT_STARTED).exists():
        assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, job_output(tmp_path, job)
        time.sleep(0.1)


def wait_for_restart(slurm: Slurm, tmp_path: Path, job: str, restart: int) -> None:
    """Until the job's log says its allocation number `restart` started."""
    out_file, deadline = tmp_path / f"smollm2-1.7b-{job}.out", time.monotonic() + 300
    while not (out_file.is_file() and f" restart {restart}: " in out_file.read_text()):
        assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, job_output(tmp_path, job)
        time.sleep(0.25)
