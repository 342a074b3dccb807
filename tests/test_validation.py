"""Validation loss during training (config `validation`) against `nanotronix.evaluate` on the checkpoints saved at the
same steps (itself checked against transformers in tests/test_evaluate.py), in one process (~20 s). Every parallel
layout's validation loss against a plain single-process forward: tests/test_parallel_layouts.py."""
from __future__ import annotations

import json

import pytest

from helpers import tiny_config, torchrun, write_learnable_store

from nanotronix.evaluate import evaluate

STEPS, INTERVAL, WINDOWS = 10, 4, 7  # 7 windows, micro-batches of 2 rows: the last round is padded


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def train(tmp_path, store, *overrides: str, stdout: list | None = None) -> list[dict]:
    tmp_path.mkdir()
    cfg = tiny_config(tmp_path, store, train={"train_steps": STEPS}, logging={"interval": 3},
                      checkpoint={"dir": str(tmp_path / "ckpt"), "interval": INTERVAL})
    proc = torchrun(1, ["-m", "nanotronix.train", "--config", str(cfg), *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    if stdout is not None:
        stdout.append(proc.stdout)
    return [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_validation_losses_are_the_checkpoints_evaluate_losses(tmp_path, store):
    # two held-out stores: the training store itself and another one (other progressions), by path relative to
    # data.root and by absolute path
    other = write_learnable_store(tmp_path / "heldout" / "other", seed=5)
    rows = train(tmp_path / "with", store, f"validation.data=[arith,{other}]", f"validation.interval={INTERVAL}",
                 f"validation.num_samples={WINDOWS}")
    validated = {r["step"]: r for r in rows if "val_loss" in r}
    assert sorted(validated) == [4, 8, 10]  # every interval and after the last step
    assert {r["step"] for r in rows} == {1, 3, 4, 6, 8, 9, 10}  # validation steps are logged too
    for step, row in validated.items():
        assert list(row["val_losses"]) == ["arith", str(other)]
        checkpoint = str(tmp_path / "with" / "ckpt" / f"step_{step:07d}")
        for name, path in (("arith", store), (str(other), other)):
            reference = evaluate(checkpoint, str(path), 32, WINDOWS)
            assert reference["step"] == step
            assert row["val_losses"][name] == pytest.approx(reference["loss"], rel=1e-6, abs=0), (step, name)
        assert row["val_loss"] == pytest.approx(sum(row["val_losses"].values()) / 2, rel=1e-12)
    assert validated[10]["val_loss"] < validated[4]["val_loss"]  # learnable progressions; the weights changed
    assert validated[10]["val_losses"]["arith"] != validated[10]["val_losses"][str(other)]

    # validating changes nothing in the run; held-out stores without an interval are not scored, and said so
    printed: list[str] = []
    plain = train(tmp_path / "without", store, "validation.data=[arith]", stdout=printed)
    assert all("val_loss" not in r for r in plain)
    assert "note: validation.data is set but validation.interval is 0: it is not scored" in printed[0]
    losses = {r["step"]: r["loss"] for r in rows}
    assert {r["step"]: r["loss"] for r in plain if r["step"] in losses} == {s: losses[s] for s in (1, 3, 6, 9, 10)}


def test_a_store_of_another_vocabulary_is_refused_at_launch(tmp_path, store, capsys):
    from nanotronix import preflight

    write_learnable_store(tmp_path / "wide", vocab=512)  # its sidecar says 512 tokens; the model has 256
    cfg = tiny_config(tmp_path, store)
    code = preflight.main(["--config", str(cfg), "train.device=cpu", f"validation.data=[{tmp_path / 'wide'}]",
                           "validation.interval=5", "validation.num_samples=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: validation.data: {tmp_path / 'wide'} was tokenized with 512 tokens, more "
                                 "than model.vocab_size=256"], err


def test_a_damaged_validation_store_is_one_line(tmp_path, store):
    """Token ids outside the vocabulary in a held-out store, negative ones included (an int32 store can hold them),
    stop the run with one line naming the store, not the embedding's IndexError."""
    import numpy as np

    from nanotronix.data.megatron_store import MegatronWriter

    tokens = np.fromfile(f"{store}.bin", dtype=np.uint16).astype(np.int32)
    tokens[40] = -1
    writer = MegatronWriter(tmp_path / "damaged", np.int32)
    writer.add_documents(tokens, [len(tokens)])
    writer.finalize({})
    cfg = tiny_config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(tmp_path / "ckpt")})
    proc = torchrun(1, ["-m", "nanotronix.train", "--config", str(cfg), f"validation.data=[{tmp_path / 'damaged'}]",
                        "validation.interval=1", "validation.num_samples=4"])
    assert proc.returncode != 0
    assert f"error: validation.data: token id -1 in {tmp_path / 'damaged'} is outside the model's vocabulary" \
        in proc.stderr and "IndexError" not in proc.stderr, proc.stderr[-3000:]
