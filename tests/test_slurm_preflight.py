"""`python -m nanotronix.preflight`, the check the Slurm scripts run before torchrun, without Slurm (~3 s)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import tiny_config, write_learnable_store
from nanotronix import preflight
from nanotronix.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def check(capsys, *argv: str) -> tuple[int, str, str]:
    code = preflight.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def test_a_good_launch_prints_one_summary_line(tmp_path, store, capsys):
    cfg = tiny_config(tmp_path, store)
    code, out, err = check(capsys, "--config", str(cfg), "--nnodes", "2", "--nproc-per-node", "2",
                           "train.device=cpu", f"checkpoint.dir={tmp_path / 'ckpt'}")
    assert (code, err) == (0, "")
    assert out.startswith("preflight ok: 2 node(s) x 2 = 4 processes on cpu | tp=1 pp=1 dp=4, grad accumulation 1")
    assert len(out.splitlines()) == 1  # nothing to note
    assert "1 stage(s), 1 token store(s) found" in out and not (tmp_path / "ckpt").exists()  # the run makes it
    held = write_learnable_store(tmp_path / "held" / "out", seed=3)
    code, out, err = check(capsys, "--config", str(cfg), "train.device=cpu", "validation.interval=5",
                           "validation.num_samples=4", f"validation.data=[arith,{held}]")
    assert code == 0 and "1 stage(s), 2 token store(s) found" in out, (out, err)  # arith counts once
    assert "| no checkpoints (checkpoint.dir not set)" in out.splitlines()[0]  # (said "checkpoints None")
    assert "note: token stores" not in out  # one tokenizer
    a = write_learnable_store(tmp_path / "sha" / "a", tokenizer_sha256="a" * 64)
    b = write_learnable_store(tmp_path / "sha" / "b", tokenizer_sha256="b" * 64)
    code, out, err = check(capsys, "--config", str(cfg), "train.device=cpu", f"data.stages.0.datasets.0.path={a}",
                           "validation.interval=5", "validation.num_samples=4", f"validation.data=[{b}]")
    assert code == 0 and f"\nnote: token stores were written with 2 different tokenizer files (aaaaaaaaaaaa: {a}; " \
                         f"bbbbbbbbbbbb: {b})" in out, out


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "1", "--nproc-per-node", "2", "parallel.tp=2", "parallel.pp=2"],
     "error: parallel: tp*pp = 2*2 = 4 needs at least 4 processes, the job has 2 (1 node(s) x 2 per node)"),
    (["--nnodes", "1", "--nproc-per-node", "3"],
     "error: train.global_batch_size: 8 is not divisible by micro_batch_size*dp = 2*3"),
    (["--nnodes", "1", "--nproc-per-node", "3", "parallel.tp=2"],
     "error: parallel: world size 3 is not divisible by tp*pp = 2*1"),
    (["--nproc-per-node", "1", "data.stages.0.datasets.0.path=/nowhere"],
     "error: token store not found: /nowhere"),
    (["--nproc-per-node", "1", "data.root=/no/such/root", "data.stages.0.datasets.0.path=arith"],
     "error: token store not found: /no/such/root/arith"),
    (["--nproc-per-node", "1", "validation.interval=5", "validation.num_samples=4", "validation.data=[heldout]"],
     "error: token store not found: "),  # joined to data.root like the datasets
    (["--nproc-per-node", "1", "validation.interval=5", "validation.num_samples=100000", "validation.data=[arith]"],
     "error: validation.num_samples: 100000 windows of 32 tokens need 3200001 tokens, "),
    (["--nproc-per-node", "1", "train.device=cuda"], "error: train.device: cuda, but no CUDA GPU is visible"),
    # a GPU job's process count on a node without GPUs: the missing GPUs, not what that count does to the batch
    (["--nproc-per-node", "3", "train.device=cuda"], "error: train.device: cuda, but no CUDA GPU is visible"),
    (["--nproc-per-node", "0"], "error: --nnodes and --nproc-per-node must be >= 1"),
    (["model.hidden_sise=3"], "error: model.hidden_sise: unknown config key"),
    # documents cut at an ordinary token: the store's sidecar says its EOS is 0
    (["--nproc-per-node", "1", "model.document_mask_eos_id=3"],
     "error: model.document_mask_eos_id: 3, but token store "),
    # a branch off another run (the anneal recipe) that names a checkpoint that is not there
    (["--nproc-per-node", "1", "checkpoint.resume=/nonexistent/step_0001430"],
     "error: checkpoint.resume: checkpoint not found: /nonexistent/step_0001430"),
    # the trainer's checks once it knows its device and world size (before: "preflight ok", then the error on
    # every rank after the rendezvous)
    (["--nproc-per-node", "1", "model.attn_implementation=sdpa_cudnn"],
     "error: model.attn_implementation: sdpa_cudnn runs in bf16 only, not train.dtype=float32"),
    (["--nproc-per-node", "2", "logging.profile_steps=1", "logging.profile_ranks=[2]"],
     "error: logging.profile_ranks: [2] names a rank this run does not have (its ranks are 0-1)"),
    (["--nproc-per-node", "1", "train.device=cpu", "model.attn_implementation=flex"],
     "error: model.attn_implementation: flex needs CUDA"),
    (["--nproc-per-node", "1", "train.device=cpu", "logging.profile_steps=1", "logging.memory_snapshot=true"],
     "error: logging.memory_snapshot: records the CUDA caching allocator; this run is on cpu"),
])
def test_a_bad_launch_is_one_line(tmp_path, store, capsys, args, message):
    if "cuda" in " ".join(args):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU, so train.device=cuda is not an error here")
    cfg = tiny_config(tmp_path, store)
    code, out, err = check(capsys, "--config", str(cfg), *args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(message), err


def test_the_run_folders_are_checked_but_not_left_behind(tmp_path, store, capsys):
    """checkpoint.dir and logging.dir must be folders that can be made and written, but the run makes them: a launch
    that fails after the preflight (here at its last check, the resume path; on a cluster, at the rendezvous) leaves
    no empty run folders that look like a run's. A folder that exists stays; one that cannot be made is one line (a
    file in the way: root may write anywhere else)."""
    cfg = tiny_config(tmp_path, store)
    run = tmp_path / "runs" / "one"
    folders = ["train.device=cpu", f"checkpoint.dir={run / 'checkpoints'}", f"logging.dir={run / 'logs'}"]
    code, out, err = check(capsys, "--config", str(cfg), *folders)
    assert code == 0 and out.startswith("preflight ok"), err
    assert not (tmp_path / "runs").exists()
    code, out, err = check(capsys, "--config", str(cfg), *folders, f"checkpoint.resume={tmp_path / 'step_0000002'}")
    assert code == 2 and "checkpoint not found" in err and not (tmp_path / "runs").exists(), err
    run.mkdir(parents=True)
    assert check(capsys, "--config", str(cfg), *folders)[0] == 0
    assert sorted(p.name for p in (tmp_path / "runs").rglob("*")) == ["one"]  # kept, and nothing made in it
    (tmp_path / "a_file").write_text("x")
    for key in ("checkpoint.dir", "logging.dir"):
        code, out, err = check(capsys, "--config", str(cfg), *folders, f"{key}={tmp_path / 'a_file' / 'run'}")
        assert (code, err) == (2, f"error: {key}: cannot write to {tmp_path / 'a_file' / 'run'} (a part of that path "
                                  "is a file, not a folder)")


def test_a_metrics_file_that_is_a_folder_is_one_line(tmp_path, store, capsys):
    """A folder named metrics.jsonl in logging.dir stops the run at its start (README); the preflight says so at
    submission, in the run's words, rather than 'preflight ok' and the job failing once it leaves the queue."""
    from nanotronix.config import load_config
    from nanotronix.train.metrics import MetricsLog

    cfg = tiny_config(tmp_path, store)
    logs = tmp_path / "logs"
    (logs / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(preflight.UserError) as run_says:  # the run's own line (rank 0's metrics log)
        MetricsLog(load_config(str(cfg), [f"logging.dir={logs}"]), enabled=True)
    code, out, err = check(capsys, "--config", str(cfg), "train.device=cpu", f"logging.dir={logs}")
    assert (code, out, err) == (2, "", f"error: {run_says.value}")
    assert "is a folder: rank 0 appends the metrics records" in err


def test_missing_config(tmp_path, capsys):
    code, out, err = check(capsys, "--config", str(tmp_path / "missing.yaml"))
    assert (code, err) == (2, f"error: config file not found: {tmp_path / 'missing.yaml'}")


def test_a_logger_whose_package_is_missing_is_one_line(tmp_path, store, capsys, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = tiny_config(tmp_path, store)
    code, out, err = check(capsys, "--config", str(cfg), "logging.wandb_project=smollm2")
    assert (code, out, err) == (2, "", "error: logging.wandb_project: needs the wandb package (pip install wandb)")
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert check(capsys, "--config", str(cfg), "logging.wandb_project=smollm2")[0] == 0  # wandb: a test extra


def test_resume_settings_the_trainer_refuses_fail_here(tmp_path, store, capsys):
    """Preflight makes the trainer's own resume decision: `resume: none` into a checkpoint.dir that holds a run, and
    an earlier step of the run's own folder, fail before torchrun starts (before: "preflight ok", then the error on
    every node after the rendezvous)."""
    from checkpoint_helpers import train_in_process

    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(tmp_path, store, train={"train_steps": 4}, checkpoint={"dir": str(ckpt), "interval": 2})
    train_in_process(cfg)
    capsys.readouterr()
    code, out, err = check(capsys, "--config", str(cfg), "checkpoint.resume=none")
    assert code == 2 and err.startswith(f"error: checkpoint.resume=none, but checkpoint.dir {ckpt} already holds "), err
    code, out, err = check(capsys, "--config", str(cfg), f"checkpoint.resume={ckpt / 'step_0000002'}",
                           "train.train_steps=6")
    assert code == 2 and "is an earlier step of this run's own checkpoint.dir (latest: step_0000004)" in err, err
    code, out, err = check(capsys, "--config", str(cfg), "checkpoint.resume=auto", "train.train_steps=6")
    assert code == 0 and out.startswith("preflight ok"), err
    assert "already holds records" not in out, out  # continued: its records follow the checkpoint's step
    # from scratch into the logging.dir of that run: the trainer's note, said at launch
    code, out, err = check(capsys, "--config", str(cfg), f"checkpoint.dir={tmp_path / 'other'}")
    assert code == 0 and f"\nnote: {tmp_path / 'logs' / 'metrics.jsonl'} already holds records " in out, (out, err)
    code, out, err = check(capsys, "--config", str(cfg), "checkpoint.resume=auto", "model.hidden_size=128")
    assert code == 2 and err.endswith("was saved with model.hidden_size=64, but the config has 128"), err
    # another global batch size, and a last step before the checkpoint's: the trainer's refusals, said at launch
    gbs = 2 * load_config(str(cfg)).train.global_batch_size
    code, out, err = check(capsys, "--config", str(cfg), f"train.global_batch_size={gbs}", "train.train_steps=6")
    assert code == 2 and err.endswith(f"but train.global_batch_size is {gbs}: the run would skip or repeat samples; "
                                      "resume with the checkpoint's global batch size"), err
    code, out, err = check(capsys, "--config", str(cfg), "train.train_steps=3")
    assert (code, err) == (2, "error: checkpoint.resume: train.train_steps=3, but the checkpoint resumed from is at "
                              "step 4: past the end of the run, nothing to train"), err
    # a checkpoint of another RoPE layout, and a truncated copy: said here, not by every rank after the rendezvous
    step = ckpt / "step_0000004"
    manifest = json.loads((step / "checkpoint.json").read_text())
    (step / "checkpoint.json").write_text(json.dumps({**manifest, "rope_layout": "interleaved"}))
    code, out, err = check(capsys, "--config", str(cfg), "checkpoint.resume=auto", "train.train_steps=6")
    assert code == 2 and err == f"error: checkpoint.resume: checkpoint {step}: rope_layout is 'interleaved', " \
                                "but this nanotronix computes 'rotate_half' (its q/k weights would need another " \
                                "layout)", err
    (step / "checkpoint.json").write_text(json.dumps(manifest))
    victim = max((p for p in step.iterdir() if p.name.endswith(".distcp")), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    os.truncate(victim, size - 1)
    code, out, err = check(capsys, "--config", str(cfg), "checkpoint.resume=auto", "train.train_steps=6")
    assert code == 2 and err == f"error: checkpoint.resume: checkpoint file damaged: {victim} has {size - 1} " \
                                f"bytes, expected {size} (truncated or overwritten)", err


def test_a_closed_stdout_is_quiet():
    import shlex
    import subprocess
    import sys

    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m nanotronix.preflight --config "
                          "examples/configs/quickstart.yaml train.device=cpu | head -c 0", shell=True, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr


def test_the_epochs_note_of_a_resume_at_another_seq_len_is_the_trainers(tmp_path, store, capsys):
    """A resume with train.seq_len doubled: the preflight says the trainer's note, whose epochs are the checkpoint's
    plus the windows read since at the new length (before, the preflight divided every sample by the new windows per
    epoch: 2.17 times over where the run reads the store 1.44 times)."""
    import re

    from checkpoint_helpers import train_in_process
    from nanotronix.data import build_train_loader

    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(tmp_path, store, train={"train_steps": 40}, checkpoint={"dir": str(ckpt), "interval": 40})
    train_in_process(cfg)
    saved = json.loads((ckpt / "step_0000040" / "checkpoint.json").read_text())["data"]["datasets"]["arith"]["epochs"]
    overrides = ["train.seq_len=64", "train.train_steps=60"]
    stream = build_train_loader(load_config(cfg, overrides), 0, 1).schedule.streams[str(store)]
    capsys.readouterr()
    code, out, err = check(capsys, "--config", str(cfg), *overrides)
    assert code == 0, err
    said = re.search(r"note: data: arith is read ([0-9.]+) times over by step 60", out)
    assert said and float(said[1]) == pytest.approx(saved + 20 * 8 / stream.windows_per_epoch, abs=0.005), out
