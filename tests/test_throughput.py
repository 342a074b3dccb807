"""tokens/s (and the TFLOP/s and MFU made from it) count the time of training: a checkpoint save and a validation pass
between two records stay out of the next record's rate, as Megatron-LM's interval timer leaves them out (it stops for
`save_checkpoint_and_time` and for evaluation), or a run's MFU would dip at every save. Each is made to take
SLOW seconds (the real one, then a sleep) in a single-process run of ~20 ms steps; the record after it must still
show a step time far below SLOW (~5 s)."""
from __future__ import annotations

import json
import time

import pytest
import torch

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


def _run_log(tmp_path, monkeypatch, world_size: int, *overrides: str):
    """A RunLog of rank 0 in a job of `world_size` ranks (single process: no collective runs) whose clock stands at
    t = 0 when it starts; returns (log, config, clock) where clock[0] is the time perf_counter returns."""
    import nanotronix.train.metrics as metrics
    from nanotronix.config import load_config
    from nanotronix.train.run_log import RunLog

    clock = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    cfg = load_config(str(tiny_config(tmp_path, write_learnable_store(tmp_path / "arith"))), list(overrides))
    return RunLog(cfg, 0, world_size, torch.device("cpu"), 1), cfg, clock


def _records(cfg) -> list[dict]:
    from pathlib import Path
    return [json.loads(line) for line in (Path(cfg.logging.dir) / "metrics.jsonl").read_text().splitlines()]


def _log_steps(log, clock, batches, seconds: float, step: int) -> None:
    """Train (as far as the log can tell) one step per batch, `seconds` of wall clock in all, then record `step`."""
    from nanotronix.train.step import StepResult

    for batch in batches:
        log.batch_read(0.0, batch)
        log.trained()
    clock[0] += seconds
    log.step(step, 1e-3, StepResult(loss=2.0, grad_norm=1.0), {}, None)


@pytest.mark.parametrize("world_size", [1, 4])
def test_tokens_per_second_and_per_gpu_are_the_definitions(tmp_path, monkeypatch, world_size):
    """3 steps of 8 windows x 32 tokens in 2 s: 384 tokens/s for the job, 384 / world_size per GPU, and the model
    TFLOP/s per GPU that rate times the FLOPs per token (causal attention over whole 32-token windows); then one
    step in 0.5 s: the next record's rate is that step's alone (512 tokens/s), not the run's tokens so far."""
    from nanotronix.train.flops import flops_per_token

    log, cfg, clock = _run_log(tmp_path, monkeypatch, world_size)
    batch = torch.ones(4, 2, 33, dtype=torch.long)  # [accumulation, micro-batch, seq_len + 1]
    _log_steps(log, clock, [batch] * 3, 2.0, 3)
    _log_steps(log, clock, [batch], 0.5, 4)  # the next record: its own step and time only
    records = _records(cfg)
    assert [r["step"] for r in records] == [3, 4]
    for record, rate in zip(records, (3 * 8 * 32 / 2.0, 8 * 32 / 0.5)):
        assert record["tokens_per_sec"] == pytest.approx(rate, rel=1e-12)
        assert record["tokens_per_sec_per_gpu"] == pytest.approx(rate / world_size, rel=1e-12)
        want_flops = rate / world_size * flops_per_token(cfg.model, 32)
        assert record["model_tflops_per_gpu"] * 1e12 == pytest.approx(want_flops, rel=1e-12)


def test_document_masked_flops_average_every_step_since_the_last_record(tmp_path, monkeypatch):
    """Two steps between records (logging.interval=2) with different documents (EOS 0): the record's model FLOPs per
    token use the mean of the two steps' spans sum(l_i^2) / S, each span written out here from its documents'
    lengths. The first step's windows hold documents of 16 + 16 tokens (span 16), the second's none (span 32)."""
    from nanotronix.train.flops import flops_per_token

    log, cfg, clock = _run_log(tmp_path, monkeypatch, 1, "model.document_mask_eos_id=0", "logging.interval=2")
    split = torch.ones(4, 2, 33, dtype=torch.long)
    split[..., 15] = 0  # inputs [0, 32): the EOS ends a 16-token document, the other 16 tokens are the next one
    whole = torch.ones(4, 2, 33, dtype=torch.long)
    _log_steps(log, clock, [split, whole], 1.0, 2)
    (record,) = _records(cfg)
    spans = [(16 ** 2 + 16 ** 2) / 32, 32 ** 2 / 32]
    logged = record["model_tflops_per_gpu"] * 1e12 / record["tokens_per_sec_per_gpu"]
    assert logged == pytest.approx(flops_per_token(cfg.model, 32, sum(spans) / 2), rel=1e-12)
    assert logged != pytest.approx(flops_per_token(cfg.model, 32, spans[-1]), rel=1e-6)  # the last step alone
