"""`train.skip_steps`: steps that are not trained (loss-spike recovery, Megatron's --skip-train-iteration-range).

References: an uninterrupted run without skips (the steps before a range, the learning rate by step), the weights and
AdamW state saved before the range (unchanged through it), the loss of those weights on the batch the sampler gives
the first step after the range (the data moves on by step), and the run itself resumed inside a range. ~10 s.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from checkpoint_helpers import read_metrics, train_in_process
from helpers import METRICS_FIELDS, run, tiny_config, write_learnable_store
from nanotronix.config import ConfigError, load_config
from nanotronix.config_checks import skipped_step_ranges

STEPS = 9
SKIPS = ["4-5", "6", "8"]  # 4-6 (merged) and 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def _config(folder, store, **sections):
    folder.mkdir(parents=True, exist_ok=True)
    return tiny_config(folder, store, **sections)


def _saved(folder, tmp_path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint step (weights and AdamW moments), read with torch's own DCP converter."""
    out = tmp_path / f"{folder.name}.pt"
    dcp_to_torch_save(folder, out)
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


def test_skipped_steps_train_nothing_and_pass_their_data_over(tmp_path, store, capsys):
    train_in_process(_config(tmp_path / "ref", store, train={"train_steps": STEPS}))
    reference = read_metrics(tmp_path / "ref" / "logs")
    ckpt = tmp_path / "run" / "ckpt"
    cfg_path = _config(tmp_path / "run", store, train={"train_steps": STEPS, "skip_steps": SKIPS},
                           checkpoint={"dir": str(ckpt), "interval": 1})
    train_in_process(cfg_path)
    shown = capsys.readouterr().out
    assert "steps 4-6: skipped (train.skip_steps), 24 samples passed over" in shown
    assert "step 8: skipped (train.skip_steps), 8 samples passed over" in shown
    got = read_metrics(tmp_path / "run" / "logs")
    assert sorted(got) == [1, 2, 3, 7, 9]
    for step in (1, 2, 3):  # before the first range: the plain run
        assert got[step]["loss"] == reference[step]["loss"] and got[step]["grad_norm"] == reference[step]["grad_norm"]
    for step in (7, 9):  # the learning rate and the data position go by step
        assert got[step]["lr"] == reference[step]["lr"]
        assert got[step]["consumed_tokens"] == reference[step]["consumed_tokens"]

    # Through a skipped range nothing changes: the checkpoint of step 6 holds step 3's weights and AdamW state
    # (the AdamW step count too, so bias correction goes on from 3).
    after_3, after_6 = _saved(ckpt / "step_0000003", tmp_path), _saved(ckpt / "step_0000006", tmp_path)
    assert after_3.keys() == after_6.keys() and any(k.startswith("optim.exp_avg") for k in after_3)
    assert all(torch.equal(after_3[k], after_6[k]) for k in after_3)
    saved = {s: json.loads((ckpt / f"step_000000{s}" / "checkpoint.json").read_text()) for s in (3, 6)}
    assert saved[3]["optimizer_step"] == saved[6]["optimizer_step"] == 3 and saved[6]["consumed_samples"] == 6 * 8

    # Step 7 trains step 3's weights on step 7's batch (what the sampler gives step 7, not step 4).
    from nanotronix.checkpoint.reader import CheckpointReader
    from nanotronix.data.loader import build_train_loader
    from nanotronix.model import build_model, cross_entropy

    reader = CheckpointReader(ckpt / "step_0000006")
    model = build_model(reader.model_config)
    reader.load_into(model)
    loader = build_train_loader(load_config(cfg_path), 0, 1)
    with torch.no_grad():
        losses = {s: torch.stack([cross_entropy(model(mb[:, :-1].long()), mb[:, 1:].long())
                                  for mb in loader.read_batch(s)]).mean().item() for s in (4, 7)}
    assert got[7]["loss"] == pytest.approx(losses[7], rel=1e-5)
    assert abs(losses[4] - losses[7]) > 1e-3  # the two batches tell apart

    # A run resumed inside a range (from step 5's checkpoint) goes on exactly as the uninterrupted one.
    resumed_cfg = _config(tmp_path / "resumed", store, train={"train_steps": STEPS, "skip_steps": SKIPS},
                              checkpoint={"dir": str(tmp_path / "resumed" / "ckpt"), "interval": 100,
                                          "resume": str(ckpt / "step_0000005")})
    train_in_process(resumed_cfg)
    again = read_metrics(tmp_path / "resumed" / "logs")
    assert sorted(again) == [6, 7, 9] and again[6]["skipped"] and again[6]["loss"] is None  # its first step is logged
    # a skipped step's record holds every field of a trained one, those of training null (a reader may take any)
    assert set(again[6]) == METRICS_FIELDS | {"skipped"}, set(again[6]) ^ METRICS_FIELDS
    assert again[6]["data_wait_ms"] is None and again[6]["peak_memory_gb"] is None
    assert all(again[s][k] == got[s][k] for s in (7, 9) for k in ("loss", "grad_norm", "lr", "consumed_tokens"))


def test_a_run_whose_steps_are_all_skipped_says_so(tmp_path, store):
    """Every step of the run in train.skip_steps: it ends saying that no update was applied (before: without a
    word, as the summary line needs a loss)."""
    proc = run(["-m", "nanotronix.train", "--config", str(_config(tmp_path, store, train={"train_steps": STEPS})),
                f"train.skip_steps=[1-{STEPS}]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (f"done: {STEPS} steps; steps 1-{STEPS} were all skipped "
                                                     "(train.skip_steps): no update was applied in this run")


@pytest.mark.parametrize("skips, message", [
    (["3-2"], "'3-2' is not within 1 <= A <= B <= train.train_steps=9"),
    (["0"], "'0' is not within"),
    (["5-10"], "'5-10' is not within"),
    (["4..6"], "'4..6' is not a step N or a range A-B"),
    (["-3"], "'-3' is not a step N or a range A-B"),
])
def test_bad_ranges_are_refused_in_one_line(tmp_path, store, skips, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(tiny_config(tmp_path, store, train={"train_steps": STEPS, "skip_steps": skips}))


def test_ranges_merge_and_take_yaml_and_overrides(tmp_path, store):
    path = tiny_config(tmp_path, store, train={"train_steps": 100})
    cfg = load_config(path, ["train.skip_steps=[20-30, 7, 31-40, 25-26, 50]"])
    assert skipped_step_ranges(cfg.train) == [(7, 7), (20, 40), (50, 50)]


def test_rollback_then_skip_equals_a_run_that_skipped_from_the_start(tmp_path, store, capsys):
    """The spike-recovery recipe: tools/rollback.py to step 4, then the same command with steps 5-6 skipped and
    checkpoint.resume auto. Its steps 7-8 equal a run that skipped 5-6 from the start, bit for bit; the rolled-back
    steps are kept aside; a requeue of the same command continues from the run's own latest step. A rollback while
    a run holds the folder is refused (the run's next save would undo it)."""
    from helpers import load_tool
    rollback = load_tool("rollback")
    assert run(["tools/rollback.py", "--help"]).returncode == 0
    train_in_process(_config(tmp_path / "ref", store, train={"train_steps": 8, "skip_steps": ["5-6"]}))
    reference = read_metrics(tmp_path / "ref" / "logs")

    ckpt = tmp_path / "run" / "ckpt"
    checkpoint = {"dir": str(ckpt), "interval": 2, "resume": "auto"}
    train_in_process(_config(tmp_path / "run", store, train={"train_steps": 8}, checkpoint=checkpoint))
    capsys.readouterr()
    logs = tmp_path / "run" / "logs"
    before = sorted(p.name for p in logs.iterdir())
    assert rollback.main([str(logs), "--to-step", "2"]) == 2  # not a checkpoint folder: refused, nothing written
    assert capsys.readouterr().err == f"error: {logs}: no committed step_NNNNNNN folder in it: nothing to roll back " \
        "to\n"
    assert sorted(p.name for p in logs.iterdir()) == before  # before: a .lock file left in it
    assert rollback.main([str(ckpt), "--to-step", "3"]) == 2  # never saved
    assert "no complete checkpoint of step 3 (committed steps: 2, 4, 6, 8)" in capsys.readouterr().err
    damaged = max((ckpt / "step_0000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[:-10])  # a truncated step: refused before anything moves
    assert rollback.main([str(ckpt), "--to-step", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint file damaged: {damaged} has ")
    assert (ckpt / "latest").read_text() == "step_0000008\n" and (ckpt / "step_0000006").is_dir()
    damaged.write_bytes(whole)
    import fcntl
    with open(ckpt / ".lock", "r+") as live:  # a run still training into the folder: its next save would undo it
        fcntl.flock(live, fcntl.LOCK_EX)
        live.truncate(0)
        live.write("host node7 pid 99 since then\n")
        live.flush()
        assert rollback.main([str(ckpt), "--to-step", "4"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: CKPT_DIR {ckpt} is in use by another run (host node7 pid 99 since then; {ckpt / '.lock'}): stop it "
        "first (its next save would undo the rollback)")
    assert (ckpt / "latest").read_text() == "step_0000008\n"
    assert rollback.main([str(ckpt), "--to-step", "4"]) == 0
    shown = capsys.readouterr().out
    assert "to step 4: latest -> step_0000004; 2 later step(s) (6, 8) moved to" in shown
    assert (ckpt / "latest").read_text() == "step_0000004\n"
    aside = [p for p in ckpt.iterdir() if p.name.startswith("rolled_back_after_step_0000004-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_0000006", "step_0000008"]

    recovered = _config(tmp_path / "run", store, train={"train_steps": 8, "skip_steps": ["5-6"]},
                        checkpoint=checkpoint)
    train_in_process(recovered)
    assert f"resumed from {ckpt / 'step_0000004'} at step 4" in capsys.readouterr().out
    got = read_metrics(tmp_path / "run" / "logs")  # the last record of a step wins
    for step in (7, 8):
        assert all(got[step][k] == reference[step][k] for k in ("loss", "grad_norm", "lr", "consumed_tokens"))
    # what plot_run draws: the rolled-back run's losses of steps 5-6 are gone (the recovered run's first step, 5,
    # skipped, is logged: before, its first record was step 7's, and the abandoned spike stayed on the curve)
    plotted = load_tool("plot_run").read_metrics(tmp_path / "run" / "logs" / "metrics.jsonl")[0]
    assert [(r["step"], r.get("loss")) for r in plotted] == [(s, got[s]["loss"]) for s in (1, 2, 3, 4)] + \
        [(5, None)] + [(s, reference[s]["loss"]) for s in (7, 8)]
    train_in_process(recovered)  # a requeue: nothing left to do, and not back to step 4
    assert f"resumed from {ckpt / 'step_0000008'} at step 8" in capsys.readouterr().out


def test_validation_due_on_a_skipped_step_still_runs_on_the_unchanged_weights(tmp_path, store, capsys):
    """A validation interval (or the last step) inside a range still validates, so the curve keeps its points: the
    record says `skipped` and holds the validation loss of the weights of the last trained step."""
    cfg = _config(tmp_path, store, train={"train_steps": STEPS, "skip_steps": ["4-6", "8-9"]},
                  validation={"data": ["arith"], "interval": 3, "num_samples": 4})
    train_in_process(cfg)
    shown = capsys.readouterr().out
    got = read_metrics(tmp_path / "logs")
    assert sorted(got) == [1, 2, 3, 6, 7, 9]
    for step in (6, 9):
        assert got[step]["skipped"] is True and got[step]["lr"] > 0
        # every field of a record (DESIGN.md's list), those of training null
        assert {k: got[step][k] for k in ("loss", "grad_norm", "tokens_per_sec", "tokens_per_sec_per_gpu",
                                          "model_tflops_per_gpu", "mfu")} == dict.fromkeys(
            ("loss", "grad_norm", "tokens_per_sec", "tokens_per_sec_per_gpu", "model_tflops_per_gpu", "mfu"))
        assert f"step      {step}/{STEPS} | skipped | val loss {got[step]['val_loss']:.4f}" in shown
    # Steps 4-6 trained nothing: step 6's validation is step 3's, to the bit; step 7 trained, so step 9's differs.
    assert got[6]["val_losses"] == got[3]["val_losses"]
    assert got[9]["val_loss"] != got[6]["val_loss"]
    assert "skipped" not in got[3] and "skipped" not in got[7]


def test_the_summary_counts_only_trained_steps_and_says_a_stop(tmp_path, store, monkeypatch):
    """train()'s summary (the `done: ... loss A -> B` line, exit 75 when preempted): its first and last loss are those
    of the first and last step trained in this run (not of a skipped one), `preempted` says a SIGUSR1 save stopped it,
    `first_step` is where this run started. The reference is the run's own metrics.jsonl (~5 s)."""
    import os
    import signal

    import nanotronix.train.trainer as trainer

    real_train_step = trainer.train_step

    def usr1_while_step_4_trains(model, optimizer, batch, lr, *args):
        if signalled == [] and metrics_so_far() == [3]:  # steps 1-2 skipped, 3 trained: this is step 4
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_train_step(model, optimizer, batch, lr, *args)

    def metrics_so_far() -> list[int]:
        path = tmp_path / "logs" / "metrics.jsonl"
        return [r["step"] for r in read_metrics(tmp_path / "logs").values() if "loss" in r] if path.exists() else []

    signalled: list[bool] = []
    monkeypatch.setattr(trainer, "train_step", usr1_while_step_4_trains)
    cfg = _config(tmp_path, store, train={"train_steps": 6, "skip_steps": ["1-2"]},
                  checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 0})
    stopped = train_in_process(cfg)
    got = read_metrics(tmp_path / "logs")
    assert signalled and sorted(got) == [3, 4]
    assert stopped == {"first_loss": got[3]["loss"], "last_loss": got[4]["loss"], "steps": 6, "first_step": 1,
                       "preempted": True}

    resumed = train_in_process(cfg)  # the requeue: from step 4's checkpoint to the end
    got = read_metrics(tmp_path / "logs")
    assert resumed == {"first_loss": got[5]["loss"], "last_loss": got[6]["loss"], "steps": 6, "first_step": 5,
                       "preempted": False}
