"""Resume is exact under every switch that keeps state or changes the step's arithmetic: a run resumed from an
uninterrupted run's mid-way checkpoint trains the remaining steps with the same loss, grad norm, learning rate and
data position, bit for bit. The reference is that uninterrupted run (the same trainer, same layout).

- fp32, a second data stage that begins after the resume point (its blend, each dataset's continuation),
  document masking, the fused chunked loss, selective recompute;
- bf16 autocast with the bf16 weight cache and the wgrad GEMMs accumulating into fp32 (gradient accumulation 4);
- two data-parallel ranks (torchrun) with ZeRO-1 (sharded AdamW moments) and asynchronous saves;
- fp32 resumed at a stage boundary: from the step before the second stage's first step, and from that step.
(Plain fp32 after a SIGKILL: test_checkpoint_resume.py; the spike guard's window: test_spike_guard.py; skipped
steps: test_skip_steps.py.) ~50 s.
"""
from __future__ import annotations

import json
import os

import pytest

from checkpoint_helpers import read_metrics, train_in_process
from helpers import tiny_config, torchrun, write_learnable_store

STEPS, RESUME_AT = 8, 4
COMPARED = ("loss", "grad_norm", "lr", "consumed_tokens", "stage")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return write_learnable_store(root / "arith"), write_learnable_store(root / "other", seed=1)


def _configs(tmp_path, stores, **sections):
    """The uninterrupted run's config (saving at RESUME_AT) and the resumed run's (from that step)."""
    arith, other = stores
    data = {"root": str(arith.parent), "stages": [
        {"name": "one", "start_step": 1, "datasets": [{"path": "arith", "weight": 1.0}]},
        {"name": "two", "start_step": RESUME_AT + 2, "datasets": [{"path": "arith", "weight": 0.5},
                                                                    {"path": other.name, "weight": 0.5}]}]}
    train = {"train_steps": STEPS, **sections.pop("train", {})}
    checkpoint = sections.pop("checkpoint", {})
    made = []
    for name, resume in (("ref", "none"), ("resumed", str(tmp_path / "ref" / "ckpt" / f"step_{RESUME_AT:07d}"))):
        (tmp_path / name).mkdir()
        made.append(tiny_config(tmp_path / name, arith, data=data, train=dict(train), **sections,
                                checkpoint={"dir": str(tmp_path / name / "ckpt"), "interval": RESUME_AT,
                                            "resume": resume, **checkpoint}))
    return made


def _assert_resumed_exactly(tmp_path):
    reference, resumed = read_metrics(tmp_path / "ref" / "logs"), read_metrics(tmp_path / "resumed" / "logs")
    assert sorted(resumed) == list(range(RESUME_AT + 1, STEPS + 1))
    assert {reference[s]["stage"] for s in resumed} == {"one", "two"}  # the stage switch happens after the resume
    for step in resumed:
        for key in COMPARED:
            assert resumed[step][key] == reference[step][key], (step, key, resumed[step][key], reference[step][key])


@pytest.mark.parametrize("switches", [
    {"model": {"document_mask_eos_id": 0}, "train": {"loss_chunk_size": 16, "recompute": "selective"}},
    {"train": {"dtype": "bfloat16", "bf16_weight_cache": True, "grad_accumulation_fusion": True}},
], ids=["fp32-stages-docmask-chunked-loss-recompute", "bf16-weight-cache-fused-accumulation"])
def test_resume_is_bit_exact_in_process(tmp_path, stores, switches):
    ref, resumed = _configs(tmp_path, stores, **switches)
    train_in_process(ref)
    train_in_process(resumed)
    _assert_resumed_exactly(tmp_path)


# Loaded by every process of the torchrun runs below (a `sitecustomize` on PYTHONPATH): which ranks read a store's
# content fingerprint.
FINGERPRINT_READS = """
import os
from nanotronix.data.store import TokenStore
read = TokenStore.fingerprint.func
def fingerprint(store):
    with open({log!r}, "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    return read(store)
TokenStore.fingerprint = property(fingerprint)
"""


def test_resume_is_bit_exact_with_two_zero1_ranks(tmp_path, stores, monkeypatch):
    """ZeRO-1 over two ranks with the bf16 weight cache and async saves: after each update a rank gathers the other
    rank's weights into its bf16 twin only, so its fp32 copy of them is stale until the save waits for their fp32
    gather; a checkpoint that held the stale weights (whichever rank writes each replicated chunk) resumed into other
    losses. Also: only rank 0 reads the stores' content fingerprints (a few hundred small reads per store, which every
    rank of a large job would repeat at each start), and its checkpoints keep them."""
    hook, reads = tmp_path / "hook", tmp_path / "fingerprint_reads.txt"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FINGERPRINT_READS.format(log=str(reads)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    ref, resumed = _configs(tmp_path, stores, parallel={"zero_stage": 1}, checkpoint={"async_save": True},
                            train={"dtype": "bfloat16", "bf16_weight_cache": True})
    for cfg in (ref, resumed):
        proc = torchrun(2, ["-m", "nanotronix.train", "--config", str(cfg)])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RNG restored" in proc.stdout
    _assert_resumed_exactly(tmp_path)
    assert set(reads.read_text().split()) == {"0"}
    manifest = json.loads((tmp_path / "resumed" / "ckpt" / f"step_{STEPS:07d}" / "checkpoint.json").read_text())
    assert set(manifest["data"]["store_fingerprints"]) == {"arith", stores[1].name}


def test_a_dataset_spelled_otherwise_on_resume_keeps_its_order(tmp_path, stores, monkeypatch):
    """Sample orders are keyed by a dataset's canonical path: a resume that spells a store otherwise (`./x`, its
    `.bin` file) reads on in the same order. The uninterrupted run here keys its datasets as they were before keys
    were canonical (as written: `./arith`, `other.bin`), as a run begun then did; its resume, spelled `arith.bin` and
    `other`, keeps those keys (the checkpoint's) and trains the same steps, bit for bit."""
    import nanotronix.data.loader as loader_module

    def key_as_written(path, root, earlier=()):  # dataset_order_key before keys were canonical
        prefix = root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path

    arith, other = stores
    ref, resumed = _configs(tmp_path, stores)
    for config, (first, second) in ((ref, ("./arith", "other.bin")), (resumed, ("arith.bin", "other"))):
        text = config.read_text().replace("path: arith", f"path: {first}").replace(f"path: {other.name}",
                                                                                  f"path: {second}")
        config.write_text(text)
    with monkeypatch.context() as patched:
        patched.setattr(loader_module, "dataset_order_key", key_as_written)
        train_in_process(ref)
    train_in_process(resumed)
    _assert_resumed_exactly(tmp_path)


def test_resume_at_a_stage_boundary_is_bit_exact(tmp_path, stores):
    """Resumed from the step just before the second stage's first step, and from that first step itself: the steps
    after, each dataset's consumed tokens and the final weights are the uninterrupted run's, bit for bit, and the
    datasets' tokens add up to the run's (the first step of stage two splits its 8 samples 4 : 4). ~5 s."""
    import torch
    from nanotronix.checkpoint.reader import CheckpointReader

    ref, resumed = _configs(tmp_path, stores, checkpoint={"interval": 1})
    train_in_process(ref)
    reference = read_metrics(tmp_path / "ref" / "logs")
    first = reference[RESUME_AT + 2]["datasets"]  # stage two's first step: 4 windows of 32 tokens from each
    assert {k: v["consumed_tokens"] - reference[RESUME_AT + 1]["datasets"][k]["consumed_tokens"]
            for k, v in first.items()} == {"arith": 4 * 32, "other": 4 * 32}
    assert sum(v["consumed_tokens"] for v in reference[STEPS]["datasets"].values()) == \
        reference[STEPS]["consumed_tokens"]

    def final_weights(run):
        return dict(CheckpointReader(tmp_path / run / "ckpt" / f"step_{STEPS:07d}").iter_tensors())

    expected = final_weights("ref")
    for at in (RESUME_AT + 1, RESUME_AT + 2):
        (tmp_path / f"at{at}").mkdir()
        config = tmp_path / f"at{at}" / "config.yaml"
        config.write_text(resumed.read_text().replace(str(tmp_path / "resumed"), str(tmp_path / f"at{at}"))
                          .replace(f"step_{RESUME_AT:07d}", f"step_{at:07d}"))
        train_in_process(config)
        after = read_metrics(tmp_path / f"at{at}" / "logs")
        assert sorted(after) == list(range(at + 1, STEPS + 1))
        for step in after:
            for key in (*COMPARED, "datasets"):
                assert after[step][key] == reference[step][key], (at, step, key)
        weights = final_weights(f"at{at}")
        assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
