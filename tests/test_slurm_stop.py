"""slurm/smollm2_1p7b.sh stopped on purpose, on the real local Slurm cluster (the cluster, the job handle and the
helpers: slurm_helpers.py).

- A cancelled job (scancel's TERM) saves and ends CANCELLED instead of requeueing itself; its log has one line per
  node's torchrun, no traceback or TCPStore errors (~15 s). So does one cancelled while it stops on USR1 (~15 s), and
  one cancelled in the preflight says that training was not started (~15 s). A USR1 to the job's steps during the
  preflight does not kill it (~15 s).
- `scontrol requeue` says that Slurm brings the job back, not that it is not requeued (~15 s), also in the script's
  first moments (~10 s).
- A job submitted with --no-requeue says so on USR1 instead of trying to requeue itself (~20 s).
- A job array's task under the array's own id reads its own state and restarts, not its sibling tasks' (~10 s).
- Each task of a job array reads its own job steps and time left (squeue), not its sibling tasks' (~10 s).

Skips only where Slurm is not installed; .ci/run installs and starts the cluster, so CI never skips.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from slurm_helpers import (ENDED, Slurm, common_sh_functions, job_output, requires_slurm,
                           submit_with_a_slow_preflight, two_stage_run, wait_for_preflight, wait_for_restart,
                           wait_for_step)

pytestmark = requires_slurm


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


def cancelled_without_requeue(slurm: Slurm, job: str, cwd: Path, said: str) -> None:
    """The job ended CANCELLED, not requeued, its log saying `said`; each node's torchrun said the stop in one line
    (nanotronix.launch), and the rendezvous store outlived the TERM (no TCPStore errors)."""
    info, out = ended_without_restart(slurm, job, cwd)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), (info, out)
    assert said in out and "requeueing job" not in out, out
    assert "Traceback" not in out and "stopped by SIGTERM; its 1 worker(s) stopped as planned" in out, out
    assert "TCPStore" not in out and "frame #" not in out, out


def test_scancel_ends_the_job_without_a_requeue(slurm, tmp_path):
    """scancel (SIGTERM): the trainer saves the step it is on and the job ends CANCELLED. Before, that save looked
    like progress to the failed-step requeue, and the cancelled job came back (Restarts=1, PENDING)."""
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                  "NPROC_PER_NODE": "1", "RUN_DIR": str(run_dir)})
    wait_for_step(slurm, job, tmp_path, run_dir / "logs" / "metrics.jsonl", 5)
    slurm.cmd("scancel", job)
    cancelled_without_requeue(slurm, job, tmp_path, "after TERM (scancel or the time limit): not requeued")
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
    cancelled_without_requeue(slurm, job, tmp_path, "after USR1, then TERM (scancel): not requeued")


def test_scancel_during_the_preflight_says_nothing_was_started(slurm, tmp_path):
    """scancel while the preflight runs (slowed down as above): Slurm stops its step too; the log says that training
    was not started, instead of nothing after the TERM line (~15 s)."""
    job = submit_with_a_slow_preflight(slurm, tmp_path)
    wait_for_preflight(slurm, tmp_path, job)
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


def test_a_usr1_to_the_job_steps_during_the_preflight_does_not_kill_it(slurm, tmp_path):
    """`scancel --signal=USR1 JOB` (no --batch) signals the job's steps, not the batch shell: during the preflight
    (slowed down as above) only its step, where USR1's default action killed it and failed the job without a line.
    The preflight ignores it as the torchrun agents do, and training starts (~15 s)."""
    job = submit_with_a_slow_preflight(slurm, tmp_path)
    wait_for_preflight(slurm, tmp_path, job)
    slurm.cmd("scancel", "--signal=USR1", job)
    deadline = time.monotonic() + 120
    while "launching on every node" not in job_output(tmp_path, job):
        assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, \
            (slurm.info(job), job_output(tmp_path, job))
        time.sleep(0.25)
    slurm.cmd("scancel", job)
    slurm.wait(job, timeout=300)
    assert not any(line.startswith("error") for line in job_output(tmp_path, job).splitlines()), \
        job_output(tmp_path, job)


def submit_with_a_slow_config_read(slurm: Slurm, tmp_path: Path, *flags: str) -> str:
    """A training job whose script reads its config's checkpoint.resume 8 s longer (a PYTHON wrapper): the script's
    first moments, before its signal handlers are in place. Returns once that read has started."""
    config, stores = two_stage_run(tmp_path)
    started, wrapper = tmp_path / "config_read", tmp_path / "python"
    wrapper.write_text(f'#!/bin/bash\ncase " $* " in *load_config*) touch "{started}"; sleep 8 ;; esac\n'
                       f'exec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "GPUS_PER_NODE": "0",
                                  "NPROC_PER_NODE": "1", "RUN_DIR": str(tmp_path / "run"), "PYTHON": str(wrapper)},
                       *flags)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert time.monotonic() < deadline and slurm.info(job)["JobState"] not in ENDED, job_output(tmp_path, job)
        time.sleep(0.1)
    return job


def test_scancel_before_the_handlers_are_set_says_nothing_was_started(slurm, tmp_path):
    """scancel in the script's first moments, before its TERM handler is in place: the shell ended without a line
    (~10 s)."""
    job = submit_with_a_slow_config_read(slurm, tmp_path)
    slurm.cmd("scancel", job)
    info = slurm.wait(job, timeout=120)
    deadline = time.monotonic() + 30  # the batch shell's line, once Slurm shows the job ended
    while "training was not started" not in job_output(tmp_path, job) and time.monotonic() < deadline:
        time.sleep(0.25)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "CANCELLED", (info, out)
    assert "TERM as the job started: training was not started (nothing was saved)" in out, out
    assert " restart 0: " not in out, out  # it came before the allocation's first line


def test_scontrol_requeue_before_the_handlers_are_set_says_the_job_comes_back(slurm, tmp_path):
    """`scontrol requeue` in the script's first moments: the early TERM line said "nothing was saved" and not that
    Slurm brings the job back, as the later TERM lines do (~10 s)."""
    job = submit_with_a_slow_config_read(slurm, tmp_path)
    slurm.cmd("scontrol", "requeue", job)
    info = slurm.wait(job, timeout=120, until=lambda i: i["JobState"] in ENDED or
                      (i["Restarts"] == "1" and i["JobState"] == "PENDING"))
    deadline = time.monotonic() + 30  # the batch shell's line, once Slurm shows the job requeued
    while "training was not started" not in job_output(tmp_path, job) and time.monotonic() < deadline:
        time.sleep(0.25)
    out = job_output(tmp_path, job)
    slurm.cmd("scancel", job)
    assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), (info, out)
    assert "TERM as the job started: training was not started; Slurm requeues the job, which resumes from its " \
           "latest checkpoint" in out, out
    assert "nothing was saved" not in out and " restart 0: " not in out, out


def test_a_usr1_before_the_handlers_are_set_is_taken_once_they_are(slurm, tmp_path):
    """A USR1 in the script's first moments (a preemption, or the time limit's in an allocation whose --time is not
    above the lead): it ended the batch shell without a line (bash's default for USR1) and the job was not requeued.
    It is now taken as any USR1 before training starts (~20 s; --no-requeue keeps the test short)."""
    job = submit_with_a_slow_config_read(slurm, tmp_path, "--no-requeue")
    slurm.cmd("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait(job, timeout=300)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), (info, out)
    assert "USR1: asking the trainer to save a checkpoint and stop" in out, out
    assert "USR1 before training started: not requeued: the job was submitted with --no-requeue" in out, out
    assert "launching on every node" not in out, out


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


def array_records(slurm: Slurm, array: str) -> dict[str, dict[str, str]]:
    """Every task of a job array, by job id: its `scontrol -o show job` fields."""
    lines = slurm.cmd("scontrol", "-o", "show", "job", array).splitlines()
    return {r["JobId"]: r for r in (dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines if line)}


def test_a_job_array_task_reads_its_own_state_and_restarts(slurm, tmp_path):
    """A job array's last task runs under the array's own id, and `scontrol show job ID` then shows every task of the
    array (as it shows every component of a het job under its leader's id): the script read all their states and
    restart counts as its own. Requeued, that task's job_ending did not match ("REQUEUED" and "RUNNING" on two
    lines: a failed preflight then printed the stopped step's CANCELLED as its error) and its TERM said "will not be
    requeued" (a restart count of "1" and "0" on two lines, no number). The script's own functions (common.sh), run
    against the real scontrol (~10 s)."""
    array = slurm.cmd("sbatch", "--parsable", "--array=0-1", "--requeue", "--output=/dev/null", "--wrap",
                      "sleep 300").strip().split(";")[0]
    slurm.jobs.append(array)

    def records() -> dict[str, dict[str, str]]:
        return array_records(slurm, array)

    deadline = time.monotonic() + 300
    while not (len(records()) == 2 and all(r["JobState"] == "RUNNING" for r in records().values())):
        assert time.monotonic() < deadline, records()
        time.sleep(0.25)
    functions = common_sh_functions("read_job_record", "record_has", "requeued_by_slurm", "job_ending", "on_term")

    def run(commands: str) -> str:
        proc = subprocess.run(["bash", "-c", f'log() {{ echo "$*"; }}\n{functions}\n{commands}'], capture_output=True,
                              text=True, timeout=60, env={**slurm.env, "SLURM_JOB_ID": array})
        return proc.stdout + proc.stderr

    assert run("job_ending; echo ending=$?") == "ending=1\n"  # running
    slurm.cmd("scontrol", "requeue", f"{array}_{records()[array]['ArrayTaskId']}")
    out = run("job_ending; echo ending=$?; PREEMPTED=0 CKPT_DIR=ckpt; on_term")
    slurm.cmd("scancel", array)
    assert "ending=0\n" in out and "TERM: Slurm is requeueing the job" in out, out


def test_a_job_array_task_reads_its_own_steps_and_time_left(slurm, tmp_path):
    """squeue, like scontrol, shows a job array's task under the array's own id with every task of the array, and
    names a task's steps ARRAYID_TASK.N (not JOBID.N) under whatever id it is asked for: step_running never saw an
    array task's own step (after srun was killed the script did not wait for it, and then took its trainer's lock for
    another run's), and the task under the array's id read every task's time left, which is no one time (a
    preemption's USR1 counted as the time limit's). The script's own functions against the real squeue (~10 s)."""
    array = slurm.cmd("sbatch", "--parsable", "--array=0-1", "--time=60", "--output=/dev/null", "--wrap",
                      # the task under the array's id has no step; the other one has a step (.0) while it runs
                      'if [ "$SLURM_JOB_ID" = "$SLURM_ARRAY_JOB_ID" ]; then sleep 300; else srun sleep 300; fi'
                      ).strip().split(";")[0]
    slurm.jobs.append(array)

    def records() -> dict[str, dict[str, str]]:
        return array_records(slurm, array)

    deadline = time.monotonic() + 300
    while not (len(records()) == 2 and all(r["JobState"] == "RUNNING" for r in records().values())
               and re.search(r"^\d+_\d+\.0$", slurm.cmd("squeue", "-h", "--steps", "-j", array, "-o", "%i"), re.M)):
        assert time.monotonic() < deadline, records()
        time.sleep(0.25)
    sibling = next(job for job in records() if job != array)
    slurm.cmd("scontrol", "update", f"JobId={sibling}", "TimeLimit=5")  # 5 minutes left, within the 600 s lead
    functions = common_sh_functions("slurm_seconds", "usr1_lead_s", "usr1_of_time_limit", "step_running")

    def run(job: str, commands: str) -> str:
        env = {**slurm.env, "SLURM_JOB_ID": job, "SLURM_ARRAY_JOB_ID": array,
               "SLURM_ARRAY_TASK_ID": records()[job]["ArrayTaskId"], "SBATCH_SIGNAL": "B:USR1@600"}
        proc = subprocess.run(["bash", "-c", f"{functions}\n{commands}"], capture_output=True, text=True, timeout=60,
                              env=env)
        return proc.stdout + proc.stderr

    said = {job: run(job, "step_running; echo step=$?; usr1_of_time_limit; echo time_limit=$?") for job in records()}
    slurm.cmd("scancel", array)
    assert said[array] == "step=1\ntime_limit=1\n", said  # no step of its own; an hour left
    assert said[sibling] == "step=0\ntime_limit=0\n", said
