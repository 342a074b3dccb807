"""slurm/smollm2_1p7b.sh and slurm/preprocess.sh on a real two-node Slurm cluster (Debian's slurm, two slurmd on this
machine, started by .ci/slurm_cluster.sh): the runs that go as planned, and the USR1 -> save -> requeue cycle. The
cluster, the job handle and the helpers: slurm_helpers.py; stops and cancels: test_slurm_stop.py; bad settings,
failures and the lock: test_slurm_failures.py; USR1 and TERM in a job's start: test_slurm_preemption.py.

- slurm/preprocess.sh as a job array of 3 tasks (~15 s): the folder of shards reads as one store equal to a
  single preprocess run of the same inputs; a task without its settings fails with one line.
- The README's CPU try-out block as written (~35 s): the quickstart model trained in a Slurm job, and a 2-task
  preprocessing array, in a scratch checkout holding a small quickstart/.
- A config that names a checkpoint to start from (a branch off another run) starts from it, not from scratch.
- End to end on CPU (~60-90 s): `sbatch --nodes=2 slurm/smollm2_1p7b.sh` with environment overrides pointing at a
  tiny two-stage config and small token stores trains with one process on each node (a torchrun agent per node,
  joined by the c10d rendezvous on the first node), checkpoints, receives USR1
  (`scancel --signal=USR1 --batch`, what `#SBATCH --signal=B:USR1@600` sends before the time limit), saves (the
  log: the trainer's line and one per node, not torchrun's failure report of an exit 75), requeues itself,
  resumes from its checkpoint and finishes; every step's loss, learning rate and data bookkeeping equal those of an
  uninterrupted torchrun of the same config (the reference).
- A USR1 that came in the workers' start-up, before their handler, is repeated until it takes, within seconds
  (~30 s).

Skips only where Slurm is not installed; .ci/run installs and starts the cluster, so CI never skips.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from helpers import torchrun
from slurm_helpers import (ENDED, ROOT, SIGNAL_AFTER, SWITCH_STEP, TRAIN_STEPS, job_output, read_records, release,
                           requires_slurm, two_stage_run, wait_for_step)

pytestmark = requires_slurm


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
    # folders whose names YAML reads otherwise, unquoted: ' #' starts a comment (the checkpoints went to
    # tmp_path/run, the stores were looked for in tmp_path/stores), ': ' makes a mapping
    run_dir = tmp_path / "run #2: it's"
    (tmp_path / "stores #1").symlink_to(stores)
    job = slurm.sbatch(tmp_path, {"CONFIG": str(tmp_path / "branch.yaml"), "DATA_ROOT": str(tmp_path / "stores #1"),
                                  "RUN_DIR": str(run_dir), "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "1"})
    info = slurm.wait(job, timeout=400)
    out = job_output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, out)
    assert f"resumed from {source / 'step_0000004'}" in out, out
    assert [r["step"] for r in read_records(run_dir / "logs" / "metrics.jsonl")] == [5, 6]
    assert (run_dir / "checkpoints" / "step_0000006").is_dir() and not (tmp_path / "run").exists()


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


# ------------------------------------------------------------------------------- the README's CPU try-out

def test_readme_cpu_try_block_runs(slurm, tmp_path, tiny_tokenizer):
    """The README's CPU try-out, run as written in a scratch checkout (links to the project's folders) holding a
    small quickstart/ (what `make quickstart` leaves there: corpus, tokenizer, stores): the quickstart model trains in
    a Slurm job, shortened to 6 steps (OVERRIDES), and the 2-task preprocessing array writes one store, equal to one
    preprocess run; each job's log is where the README says. ~40 s."""
    from nanotronix.data import PreprocessOptions, open_store, preprocess
    from helpers import CORPUS, readme_bash_block

    commands = readme_bash_block("\nTo try the scripts on a cluster without GPUs")
    assert [c.split("sbatch ")[-1].split()[-1] for c in commands[1:]] == [
        "slurm/smollm2_135m.sh", "slurm/preprocess.sh"], commands
    for name in ("nanotronix", "tools", "slurm", "examples", ".ci"):
        (tmp_path / name).symlink_to(ROOT / name)
    quickstart = tmp_path / "quickstart"
    quickstart.mkdir()
    (quickstart / "tokenizer.json").write_bytes(open(tiny_tokenizer, "rb").read())
    texts = [f"{i}: {CORPUS[i % len(CORPUS)]}" for i in range(400)]  # ~40k tokens: the held-out windows fit
    (quickstart / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for name in ("stdlib", "heldout"):
        preprocess(PreprocessOptions([str(quickstart / "corpus.jsonl")], str(quickstart / "tokenizer.json"),
                                     str(quickstart / "data" / name), progress=False))
    short_run = ("train.train_steps=6 lr_schedule.warmup_steps=2 lr_schedule.decay_start_step=4 "
                 "lr_schedule.decay_steps=2 validation.interval=3 checkpoint.interval=3")
    env = {**slurm.env, "PYTHON": sys.executable, "OVERRIDES": short_run}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    submitted = re.findall(r"Submitted batch job (\d+)", proc.stdout)
    slurm.jobs += submitted  # cancelled at the end whatever happens below (a failing block may have submitted one)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train_job, array_job = submitted

    info = slurm.wait(train_job, timeout=300)
    log = (tmp_path / f"smollm2-135m-{train_job}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, log[-3000:])
    assert "2 process(es) on cpu" in log and "done: 6 steps" in log, log[-3000:]
    for task in (f"{array_job}_0", f"{array_job}_1"):
        info = slurm.wait(task, timeout=300)
        log = (tmp_path / f"preprocess-{task}.out").read_text()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, log)
    sharded = open_store(quickstart / "sharded")
    assert sharded.metadata["shards"] == 2
    assert (quickstart / "data" / "stdlib.bin").read_bytes() == b"".join(
        (quickstart / "sharded" / f"shard-{i:05d}-of-00002.bin").read_bytes() for i in range(2))


# ------------------------------------------------------------------------------- USR1 -> save -> requeue


def test_usr1_saves_requeues_resumes_and_continues_the_same_run(slurm, tmp_path):
    config, stores = two_stage_run(tmp_path)
    run_dir = tmp_path / "run"
    metrics = run_dir / "logs" / "metrics.jsonl"

    # Interval saves in the background, as the SmolLM2 recipes make them; the save on USR1 is blocking.
    job = slurm.sbatch(tmp_path, {"CONFIG": str(config), "DATA_ROOT": str(stores), "RUN_DIR": str(run_dir),
                                  "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "1",
                                  "OVERRIDES": "checkpoint.async_save=true"}, nodes=2)
    placed = slurm.wait(job, 60, lambda i: i.get("NodeList", "") not in ("", "(null)"))
    nodes = slurm.cmd("scontrol", "show", "hostnames", placed["NodeList"]).split()
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
