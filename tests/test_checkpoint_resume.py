"""Resume through the real trainer (`python -m nanotronix.train` / torchrun), against an uninterrupted run.

- exact: a run (asynchronous saves) SIGKILLed at a random step after its first checkpoint and restarted
  reproduces the uninterrupted run's per-step loss, grad norm, lr and data position bit for bit (fp32, same layout);
- resharded: saved in TP2xPP2xDP2, resumed in TP1xPP1xDP1 and TP2xPP1xDP4, whose checkpoint resumes in
  TP1xPP4xDP2: losses continue to rel 1e-5 of the uninterrupted single-process run;
- started from a Hugging Face import (weights only, new rope_theta), and a requeued job keeps its own progress.
Costs ~60-90 s on 2 cores (three 8-rank torchrun launches dominate).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, run, tiny_config, torchrun, write_learnable_store

STEPS = 40


def _config(folder: Path, store: Path, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return tiny_config(folder, store, **sections)


def metrics(log_dir: Path) -> dict[int, dict]:
    """Per step, the LAST record written (a restarted run rewrites the steps after its checkpoint)."""
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def _train(cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), *overrides])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path, store):
    reference = _config(tmp_path / "ref", store, train={"train_steps": STEPS})
    _train(reference)
    expected = metrics(tmp_path / "ref" / "logs")

    cfg = _config(tmp_path / "run", store, train={"train_steps": STEPS},
                      checkpoint={"dir": str(tmp_path / "run" / "ckpt"), "interval": 7, "async_save": True})
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "nanotronix.train", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_at = random.Random().randint(8, STEPS - 5)  # after the first checkpoint (step 7), before the end
    log = tmp_path / "run" / "logs" / "metrics.jsonl"
    while not (log.is_file() and len(log.read_text().splitlines()) >= kill_at):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = len(log.read_text().splitlines())
    assert killed_after < STEPS, "the run finished before it could be killed"

    second = _train(cfg)
    assert "checkpoint: resumed from" in second.stdout and "RNG restored" in second.stdout
    got = metrics(tmp_path / "run" / "logs")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "consumed_tokens", "stage"):
            assert got[step][key] == expected[step][key], (f"killed after step {killed_after}", step, key)


def _rel_close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * abs(b)


def test_resharded_resume_continues_the_run(tmp_path, store):
    total = 7
    reference = _config(tmp_path / "ref", store, train={"train_steps": total})
    _train(reference)
    expected = metrics(tmp_path / "ref" / "logs")

    def layout_run(name: str, tp: int, pp: int, dp: int, steps: int, resume: str) -> dict[int, dict]:
        cfg = _config(tmp_path / name, store, train={"train_steps": steps},
                          checkpoint={"dir": str(tmp_path / name / "ckpt"), "resume": resume})
        args = ["-m", "nanotronix.train", "--config", str(cfg), f"parallel.tp={tp}", f"parallel.pp={pp}"]
        if pp == 4:  # 1F1B over 4 stages needs 4 micro-batches: same global batch, smaller micro-batches
            args.append("train.micro_batch_size=1")
        proc = torchrun(tp * pp * dp, args) if tp * pp * dp > 1 else run(args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return metrics(tmp_path / name / "logs")

    first = layout_run("tp2pp2dp2", 2, 2, 2, 4, "none")
    for step in range(1, 5):
        assert _rel_close(first[step]["loss"], expected[step]["loss"]), step
    saved = str(tmp_path / "tp2pp2dp2" / "ckpt")
    chains = [("tp1pp1dp1", (1, 1, 1), 5, saved), ("tp2pp1dp4", (2, 1, 4), 6, saved),
              ("tp1pp4dp2", (1, 4, 2), total, str(tmp_path / "tp2pp1dp4" / "ckpt"))]
    for name, (tp, pp, dp), steps, source in chains:
        got = layout_run(name, tp, pp, dp, steps, source)
        start = min(got)
        assert start == json.loads((Path(source) / (Path(source) / "latest").read_text().strip() /
                                    "checkpoint.json").read_text())["step"] + 1, name
        for step in range(start, steps + 1):
            assert got[step]["lr"] == expected[step]["lr"]
            assert _rel_close(got[step]["loss"], expected[step]["loss"]), (name, step, got[step]["loss"],
                                                                            expected[step]["loss"])


def test_start_from_hf_import_and_requeue_keeps_progress(tmp_path, store):
    """convert_from_hf -> checkpoint.resume=PATH (weights only, step 1, a new rope_theta); a requeue of the same
    command continues from the run's own checkpoint instead of going back to PATH."""
    from nanotronix.checkpoint.hf_export import export_to_hf

    base = _config(tmp_path / "base", store, train={"train_steps": 3},
                       checkpoint={"dir": str(tmp_path / "base" / "ckpt")})
    _train(base)
    export_to_hf(tmp_path / "base" / "ckpt", tmp_path / "hf", progress=False, log=lambda _: None)
    proc = run(["tools/convert_from_hf.py", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")])
    assert proc.returncode == 0, proc.stderr

    cfg = _config(tmp_path / "cont", store, train={"train_steps": 2}, model={"rope_theta": 130000.0},
                      checkpoint={"dir": str(tmp_path / "cont" / "ckpt"), "resume": str(tmp_path / "imported")})
    first = _train(cfg)
    assert "model.rope_theta: 10000.0 in the checkpoint, 130000.0 now" in first.stdout
    assert "at step 0: weights only" in first.stdout
    assert sorted(metrics(tmp_path / "cont" / "logs")) == [1, 2]
    again = _train(cfg, "train.train_steps=3")  # the requeued job, with the same checkpoint.resume
    assert "already holds this run's checkpoints: continuing from step_0000002" in again.stdout
    assert min(json.loads(line)["step"] for line in
               (tmp_path / "cont" / "logs" / "metrics.jsonl").read_text().splitlines()[2:]) == 3
