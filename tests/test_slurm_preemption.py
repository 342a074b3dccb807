"""slurm/smollm2_1p7b.sh's USR1 and TERM at the edges of a job's start, on the real local Slurm cluster (the cluster,
the job handle and the helpers: slurm_helpers.py).

- The time limit's USR1 before a checkpoint in two allocations in a row (`sbatch --time=2` with the recipe's
  #SBATCH --signal=B:USR1@600) ends the job with one line instead of requeueing it forever (~2 min); two USR1s that
  are not the time limit's (`scancel --signal=USR1 --batch`, as a preemption or an admin sends) in two start-ups in a
  row requeue the job both times (~1 min).
- A TERM that comes just as the preflight succeeded starts no training; `scontrol requeue` in the preflight says
  that Slurm brings the job back (~20 s each).

The preflight is slowed down (a PYTHON wrapper) so that the signal lands in it, as in a large job's start.
"""
from __future__ import annotations

import pytest

from slurm_helpers import ENDED, job_output, release, requires_slurm, submit_with_a_slow_preflight, wait_for_restart

pytestmark = requires_slurm


def requeued_or_ended(slurm, job: str, restart: int) -> dict[str, str]:
    """scontrol's fields once the job is PENDING again after allocation `restart` (its COMPLETING is over), or ended."""
    return slurm.wait(job, timeout=300, until=lambda i: i["JobState"] in ENDED or
                      (i["Restarts"] != str(restart) and i["JobState"] == "PENDING"))


def test_the_time_limits_usr1_before_a_checkpoint_in_two_allocations_in_a_row_ends_the_requeues(slurm, tmp_path):
    """A --time not above the --signal lead: Slurm sends USR1 as soon as every allocation starts (its time-limit
    check, every 30 s, finds less time left than the lead), before the trainer saved anything, and each requeue stopped
    the same way, forever. One such requeue is allowed; the second ends the job with one line. The preflight is held
    35 s so that the USR1 lands in it, within the 2-minute limit."""
    job = submit_with_a_slow_preflight(slurm, tmp_path, "--time=2", hold_s=35)
    wait_for_restart(slurm, tmp_path, job, 0)
    info = requeued_or_ended(slurm, job, 0)
    assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), (info, job_output(tmp_path, job))
    release(slurm, job)
    wait_for_restart(slurm, tmp_path, job, 1)
    info = requeued_or_ended(slurm, job, 1)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "1"), (info, out)
    assert out.count(f"USR1 before training started: requeueing job {job}") == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: the time limit's USR1 came before a checkpoint in two allocations in a row (still at step 0): not "
        "requeued again"), out
    assert "launching on every node" not in out, out
    # each allocation's log says why: a job that saves a few steps after such a USR1 is requeued on and on
    assert out.count("warning: the time limit's USR1 came ") == 2 and "less than the USR1 lead (600 s)" in out, out


def test_usr1s_that_are_not_the_time_limits_requeue_the_job_every_time(slurm, tmp_path):
    """A preemption (or an admin's `scancel --signal=USR1`) during two long start-ups in a row: the job has most of its
    24 hours left each time, so the USR1 is not the time limit's, and the job is requeued both times. Before, the
    guard against a --time not above the lead counted every USR1 and ended the job at the second."""
    job = submit_with_a_slow_preflight(slurm, tmp_path)
    for restart in (0, 1):
        wait_for_restart(slurm, tmp_path, job, restart)
        slurm.cmd("scancel", "--signal=USR1", "--batch", job)
        info = requeued_or_ended(slurm, job, restart)
        assert (info["JobState"], info["Restarts"]) == ("PENDING", str(restart + 1)), (info, job_output(tmp_path, job))
        if restart == 0:
            release(slurm, job)
    out = job_output(tmp_path, job)
    slurm.cmd("scancel", job)
    assert out.count(f"USR1 before training started: requeueing job {job}") == 2, out
    assert not any(line.startswith("error") for line in out.splitlines()), out
    assert "launching on every node" not in out, out


@pytest.mark.parametrize("requeue", [False, True], ids=["term", "requeue"])
def test_a_term_at_the_end_of_the_preflight_starts_no_training(slurm, tmp_path, requeue):
    """Slurm's TERM while the preflight's srun returns 0 (here to the batch shell alone, sent from the preflight's step
    once the preflight itself has succeeded): the shell's trap runs once srun has returned, and the script went on to
    launch training all the same. It now ends as a TERM in the preflight does, with one line. `scontrol requeue` TERMs
    the preflight's step too (srun then fails): the line says that Slurm brings the job back (~20 s each)."""
    signal = 'scontrol requeue "$SLURM_JOB_ID"' if requeue else 'scancel --signal=TERM --batch "$SLURM_JOB_ID"'
    job = submit_with_a_slow_preflight(slurm, tmp_path, hold_s=0, then=f"{signal}; sleep 3")
    info = requeued_or_ended(slurm, job, 0)
    out = job_output(tmp_path, job)
    slurm.cmd("scancel", job)
    assert "launching on every node" not in out and not any(line.startswith("error") for line in out.splitlines()), out
    if requeue:
        assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), (info, out)
        assert "TERM: Slurm is requeueing the job (scontrol requeue or a preemption)" in out, out
        assert ("the TERM came during the preflight: training was not started; Slurm requeues the job, which resumes "
                f"from the latest checkpoint in {tmp_path / 'run' / 'checkpoints'}") in out, out
    else:
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), (info, out)
        assert "] preflight ok: " in out, out  # the preflight succeeded (its summary is a log line)
        assert "TERM: waiting for the job step to stop (the job will not be requeued)" in out, out
        assert "the TERM came as the preflight ended: training was not started (nothing was saved)" in out, out
