"""`train.spike_skip_sigma`: a step whose loss or gradient norm spikes is not applied (OLMo 2's skip-step guard).

The spikes are real: a learnable store (arithmetic progressions) with one step of random tokens at steps 30 and 40
(data stages of one step each). References: the run without the guard (the same loss at the spike, then other
weights), the checkpoint before the spike (unchanged through it), and the guarded run itself resumed after the
first spike (it must skip the second one too: the window comes back from the checkpoint). ~20 s.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from checkpoint_helpers import read_metrics, train_in_process
from helpers import tiny_config, write_learnable_store
from nanotronix.config import ConfigError, load_config
from nanotronix.train.spike_guard import SpikeGuard

STEPS, SPIKES, WINDOW = 45, (30, 40), 8


def _noise_store(prefix):
    from nanotronix.data.megatron_store import MegatronWriter

    rng = np.random.default_rng(3)
    writer = MegatronWriter(prefix, np.uint16)
    for _ in range(100):
        writer.add_document(np.append(rng.integers(1, 256, 100), 0))
    writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": 256, "eos_id": 0}})
    return prefix


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    write_learnable_store(root / "arith")
    _noise_store(root / "noise")
    return root


def _config(folder, root, **train):
    """Arithmetic data, but random tokens for exactly the steps in SPIKES."""
    stages, start = [], 1
    for spike in SPIKES:
        stages += [{"name": f"arith_{start}", "start_step": start, "datasets": [{"path": "arith", "weight": 1.0}]},
                   {"name": f"noise_{spike}", "start_step": spike, "datasets": [{"path": "noise", "weight": 1.0}]}]
        start = spike + 1
    stages.append({"name": f"arith_{start}", "start_step": start, "datasets": [{"path": "arith", "weight": 1.0}]})
    folder.mkdir(parents=True, exist_ok=True)
    return tiny_config(folder, root / "arith", train={"train_steps": STEPS, **train},
                       data={"root": str(root), "stages": stages},
                       checkpoint={"dir": str(folder / "ckpt"), "interval": 1})


def _weights(folder, tmp_path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{folder.parent.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(folder, out)
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


def test_spikes_are_skipped_exactly_and_the_window_survives_a_resume(tmp_path, stores, capsys):
    guarded = {"spike_skip_sigma": 6.0, "spike_skip_window": WINDOW}
    train_in_process(_config(tmp_path / "guard", stores, **guarded))
    shown = capsys.readouterr().out
    got = read_metrics(tmp_path / "guard" / "logs")
    train_in_process(_config(tmp_path / "plain", stores))
    plain = read_metrics(tmp_path / "plain" / "logs")

    # Exactly the two spikes are skipped, said on the console and in the metrics.
    assert sorted(s for s, r in got.items() if "update_skipped" in r) == list(SPIKES), got
    for spike in SPIKES:
        assert f"step {spike}: update skipped (train.spike_skip_sigma): " in shown
        assert re.search(r"(loss|gradient norm) [\d.]+ is [\d.]+ sigma above the last 8 steps'",
                         got[spike]["update_skipped"])
    # Up to the first spike, and at it, the guarded run is the plain run (the guard only watches).
    for step in range(1, SPIKES[0] + 1):
        assert got[step]["loss"] == plain[step]["loss"], step
    assert got[SPIKES[0]]["loss"] > got[SPIKES[0] - 1]["loss"] + 1  # random tokens: a real spike
    # The skipped update changed nothing (weights, AdamW moments and step count); the plain run's did.
    ckpt, plain_ckpt = tmp_path / "guard" / "ckpt", tmp_path / "plain" / "ckpt"
    before, after = _weights(ckpt / "step_0000029", tmp_path), _weights(ckpt / "step_0000030", tmp_path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    plain_after = _weights(plain_ckpt / "step_0000030", tmp_path)
    assert not all(torch.equal(before[k], plain_after[k]) for k in before)
    assert got[SPIKES[0] + 1]["loss"] != plain[SPIKES[0] + 1]["loss"]

    # Resumed between the spikes from the guarded run's checkpoint, it skips the second spike too and is the
    # uninterrupted run bit for bit (without its saved window it would start empty and apply step 40).
    resumed_cfg = _config(tmp_path / "resumed", stores, **guarded)
    train_in_process(resumed_cfg, f"checkpoint.resume={ckpt / 'step_0000035'}")
    again = read_metrics(tmp_path / "resumed" / "logs")
    assert sorted(again) == list(range(36, STEPS + 1))
    for step in again:
        assert again[step]["loss"] == got[step]["loss"] and again[step]["grad_norm"] == got[step]["grad_norm"], step
    assert "update_skipped" in again[SPIKES[1]]


def test_the_guard_waits_for_a_full_window_and_judges_by_sigma():
    guard = SpikeGuard(sigma=3.0, window=4)
    assert [guard.judge(x, 1.0) for x in (2.0, 2.1, 1.9, 50.0)] == [None] * 4  # window not full yet: no judgement
    guard = SpikeGuard(sigma=3.0, window=4, state={"losses": [2.0, 2.1, 1.9, 2.0], "grad_norms": [1.0] * 4})
    assert guard.judge(2.2, 1.0) is None  # 2.2 < 2.0 + 3 * 0.07
    reason = guard.judge(9.0, 1.0)
    mean = (2.1 + 1.9 + 2.0 + 2.2) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in (2.1, 1.9, 2.0, 2.2)) / 4)
    assert reason == f"loss 9 is {(9.0 - mean) / std:.1f} sigma above the last 4 steps' ({mean:.4g} +- {std:.2g})"
    assert guard.state_dict()["losses"] == [1.9, 2.0, 2.2, 9.0]  # the spike enters the window too
    assert guard.judge(2.0, 1e9) is None  # identical gradient norms (std 0): nothing to measure against
    assert "gradient norm" in SpikeGuard(3.0, 2, {"losses": [1.0, 1.1], "grad_norms": [1.0, 1.2]}).judge(1.0, 9.0)


def test_a_window_of_one_repeated_value_judges_nothing():
    """sum([0.1] * 3) / 3 is 1 ulp above 0.1, which made the std of a window of three 0.1s 1.4e-17, not 0, and a next
    gradient norm of 0.3 a spike of 1.4e16 sigma (found by tests/test_train_properties.py)."""
    guard = SpikeGuard(sigma=0.5, window=3, state={"losses": [0.1] * 3, "grad_norms": [0.1] * 3})
    assert guard.judge(0.1, 0.3) is None
    assert SpikeGuard(6.0, 3, {"losses": [0.1] * 3, "grad_norms": [1.0] * 3}).judge(1e9, 1.0) is None


def test_a_window_of_tiny_different_values_has_a_spread():
    """statistics.pstdev given the mean squares the float deviations: [0, 3e-287] had a std of 0 (judged nothing)
    where it is 1.5e-287 (found by a random-seed run of tests/test_train_properties.py)."""
    guard = SpikeGuard(sigma=0.5, window=2, state={"losses": [0.1, 0.1], "grad_norms": [0.0, 3e-287]})
    assert guard.judge(0.1, 0.1).startswith("gradient norm 0.1 is ")


@pytest.mark.parametrize("state", [{"losses": 5, "grad_norms": []}, {"losses": ["2.5"], "grad_norms": [1.0]},
                                   {"losses": [2.5], "grad_norms": [float("nan")]}, {"losses": [2.5]}, [2.5]])
def test_a_window_edited_in_the_checkpoint_is_one_user_error(state):
    """The window comes back from the checkpoint's trainer_state: edited into another shape it was a TypeError (at the
    resume, or at the first step judged against a string), or a nan mean that judged nothing."""
    from nanotronix.errors import UserError

    with pytest.raises(UserError, match="the checkpoint's trainer_state.spike_guard.(losses|grad_norms) is damaged"):
        SpikeGuard(6.0, 1, state)


def test_bad_settings_are_refused(tmp_path, stores):
    cfg = _config(tmp_path, stores)
    with pytest.raises(ConfigError, match="train.spike_skip_sigma: must be >= 0"):
        load_config(cfg, ["train.spike_skip_sigma=-1"])
    with pytest.raises(ConfigError, match="train.spike_skip_window: must be >= 2"):
        load_config(cfg, ["train.spike_skip_window=1"])


def test_the_spike_guards_loss_window_holds_the_losses(tmp_path):
    """The guard judges (loss, gradient norm) against windows of the same quantities: after 6 steps with a window of
    4, the checkpoint's trainer_state holds the last 4 logged losses under `losses` and the last 4 logged gradient
    norms under `grad_norms`. tests/test_spike_guard.py's run spikes both at once and accepts either name in its
    message, so a training step that handed the guard (gradient norm, loss) in the wrong order skipped the same steps,
    said "loss" for the gradient norm, and saved each window under the other's name (~5 s)."""
    from nanotronix.checkpoint.paths import MANIFEST_NAME

    cfg = tiny_config(tmp_path, write_learnable_store(tmp_path / "arith"),
                      train={"train_steps": 6, "spike_skip_sigma": 1000.0, "spike_skip_window": 4},
                      checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 6})
    train_in_process(cfg)
    rows = read_metrics(tmp_path / "logs")
    manifest = json.loads((tmp_path / "ckpt" / "step_0000006" / MANIFEST_NAME).read_text())
    window = manifest["trainer_state"]["spike_guard"]
    assert window["losses"] == [rows[s]["loss"] for s in range(3, 7)]
    assert window["grad_norms"] == [rows[s]["grad_norm"] for s in range(3, 7)]
