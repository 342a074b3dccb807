"""tokens/s (and the TFLOP/s and MFU made from it) count the time of training: a checkpoint save and a validation pass
between two records stay out of the next record's rate, as Megatron-LM's interval timer leaves them out (it stops for
`save_checkpoint_and_time` and for evaluation), or a run's MFU would dip at every save. Each is made to take
SLOW seconds (the real one, then a sleep) in a single-process run of ~20 ms steps; the record after it must still
show a step time far below SLOW (~5 s)."""
from __future__ import annotations

import time

import pytest

from checkpoint_helpers import read_metrics, train_in_process
from helpers import tiny_config, write_learnable_store

SLOW = 1.5


def _slowed(monkeypatch, cls, name: str) -> list[int]:
    """cls.name takes SLOW seconds more; returns the list its calls are counted in."""
    calls = []
    original = getattr(cls, name)

    def slow(*args, **kwargs):
        result = original(*args, **kwargs)
        time.sleep(SLOW)
        calls.append(1)
        return result
    monkeypatch.setattr(cls, name, slow)
    return calls


@pytest.mark.parametrize("pause", ["checkpoint", "validation"])
def test_a_save_or_a_validation_stays_out_of_the_next_records_rate(tmp_path, monkeypatch, pause):
    from nanotronix.checkpoint import Checkpointer
    from nanotronix.train.validation import Validator

    store = write_learnable_store(tmp_path / "arith")
    sections = {"train": {"train_steps": 6}, "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 3}}
    if pause == "validation":
        sections["validation"] = {"data": ["arith"], "interval": 3, "num_samples": 4}
    calls = _slowed(monkeypatch, Checkpointer, "save") if pause == "checkpoint" else \
        _slowed(monkeypatch, Validator, "run")
    train_in_process(tiny_config(tmp_path, store, **sections))
    assert len(calls) == 2  # after steps 3 and 6
    rows = read_metrics(tmp_path / "logs")
    assert sorted(rows) == list(range(1, 7))
    tokens_per_step = 8 * 32
    step_seconds = {s: tokens_per_step / r["tokens_per_sec"] for s, r in rows.items()}
    # the record the pause would land in: a save comes after its step's record (step 4's), a validation before it
    # (step 3's own record, and step 6's)
    paused_in = [4] if pause == "checkpoint" else [3, 6]
    assert all(step_seconds[s] < SLOW / 3 for s in paused_in), step_seconds  # their own time only
    per_gpu = rows[4]["tokens_per_sec_per_gpu"]
    assert rows[4]["model_tflops_per_gpu"] == pytest.approx(per_gpu * rows[5]["model_tflops_per_gpu"] /
                                                            rows[5]["tokens_per_sec_per_gpu"])
