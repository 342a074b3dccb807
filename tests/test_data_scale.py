"""Schedule scale: the full SmolLM2-1.7B schedule (5.24M steps x 1024 samples x 2048 tokens, 4 stages,
10 sources) over synthetic Megatron stores whose headers claim billions of documents and trillions of tokens
(sparse files: nothing is built). Asserts < 1 GiB of memory growth and < 30 s to be ready (the stores' content
fingerprints read), per rank. ~2 s."""
from __future__ import annotations

import struct
import time
from pathlib import Path


from nanotronix.config import config_from_dict
from nanotronix.data import build_train_loader

# Sizes of the order of SmolLM2's sources (tokens); ~1000 tokens per document.
SOURCES = {
    "fineweb_edu": 1.3e12, "dclm": 3.8e12, "starcoderdata": 2.5e11, "open_web_math": 1.2e10,
    "stack_edu": 1.25e11, "infiwebmath": 4.0e10, "finemath": 5.0e10, "aug_gsm8k": 2.0e8,
    "cosmopedia_v2": 3.0e10, "jupyter": 1.5e10,
}
STAGES = [  # SmolLM2-1.7B (arXiv 2502.02737, Sec. 4); unpublished bucket splits set evenly here
    ("stage1_stable", 1, {"fineweb_edu": 0.54, "dclm": 0.36, "starcoderdata": 0.10}),
    ("stage2_stable", 2861023, {"fineweb_edu": 0.45, "dclm": 0.30, "starcoderdata": 0.20, "open_web_math": 0.05}),
    ("stage3_stable", 3814698, {"fineweb_edu": 0.296, "dclm": 0.444, "stack_edu": 0.08, "jupyter": 0.08,
                                "open_web_math": 0.05, "infiwebmath": 0.05}),
    ("stage4_decay", 4716001, {"fineweb_edu": 0.232, "dclm": 0.348, "stack_edu": 0.24, "finemath": 0.139,
                               "open_web_math": 0.0008, "aug_gsm8k": 0.0002, "cosmopedia_v2": 0.04}),
]
STEPS, GBS, SEQ, MBS, DP = 5_240_000, 1024, 2048, 4, 256


def _sparse_megatron(prefix: Path, num_tokens: int, tokens_per_doc: int = 1000) -> None:
    """A header-only Megatron store: header, last length/pointer and last document index written at their
    spec offsets into sparse files; everything else reads as zeros and is never touched by the sampler."""
    n = num_tokens // tokens_per_doc
    last_len = num_tokens - (n - 1) * tokens_per_doc
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1))
        f.seek(34 + 4 * (n - 1))
        f.write(struct.pack("<i", last_len))
        f.seek(34 + 4 * n + 8 * (n - 1))
        f.write(struct.pack("<q", (num_tokens - last_len) * 2))
        f.seek(34 + 12 * n + 8 * n)
        f.write(struct.pack("<q", n))
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(num_tokens * 2)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_smollm2_1p7b_schedule_memory_and_startup(tmp_path):
    for name, tokens in SOURCES.items():
        _sparse_megatron(tmp_path / name, int(tokens))
    cfg = config_from_dict({
        "model": {"preset": "smollm2-1.7b", "num_hidden_layers": 1},
        "train": {"seq_len": SEQ, "global_batch_size": GBS, "micro_batch_size": MBS, "train_steps": STEPS},
        "data": {"data_seed": 8, "stages": [
            {"name": n, "start_step": s, "datasets": [{"path": str(tmp_path / d), "weight": w} for d, w in ds.items()]}
            for n, s, ds in STAGES]},
    })
    rss_before = _rss_bytes()
    start = time.perf_counter()
    loader = build_train_loader(cfg, dp_rank=DP - 1, dp_size=DP, consumed_samples=4_716_000 * GBS)
    batch = loader.batch(4_716_001)  # first step of the decay stage, resumed there
    loader.stats(4_716_000, fingerprints=True)  # rank 0 at a resume: every store's content fingerprint
    ready = time.perf_counter() - start
    for step in (1, 2_861_022, 2_861_023, 3_814_698, STEPS):
        assert loader.batch(step).shape == (GBS // (MBS * DP), MBS, SEQ + 1)
    stats = loader.stats(STEPS)
    grown = _rss_bytes() - rss_before
    assert ready < 30, f"ready after {ready:.1f} s"
    assert grown < 1 << 30, f"memory grew by {grown / 2**20:.0f} MiB"
    assert batch.shape == (1, MBS, SEQ + 1)
    assert stats["stage"] == "stage4_decay" and loader.stats(3_814_697)["stage"] == "stage2_stable"
    total = sum(d["consumed_tokens"] for d in stats["datasets"].values())
    assert total == STEPS * GBS * SEQ  # ~1.1e13 tokens, every sample accounted for
    # SmolLM2 saw ~2 epochs of its web data; the tiny AugGSM8K source repeats many times
    assert 0.5 < stats["datasets"][str(tmp_path / "dclm")]["epochs"] < 3
    assert stats["datasets"][str(tmp_path / "aug_gsm8k")]["epochs"] > 1
    # the stage-4 share of a tiny source is honoured over the whole stage (within one sample per tree level)
    plan = loader.schedule.stages[3]
    counts = plan.tree.counts((STEPS - 4_716_000) * GBS)
    i = plan.datasets.index(str(tmp_path / "aug_gsm8k"))
    assert abs(counts[i] - 0.0002 * (STEPS - 4_716_000) * GBS) <= 0.01 * 0.0002 * (STEPS - 4_716_000) * GBS
