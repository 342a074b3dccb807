"""The trainer end to end on a tiny store (single process, ~15 s), and its one-line errors on bad input."""
import json

import pytest

from helpers import run, tiny_config, torchrun, write_learnable_store

REQUIRED = {"step", "loss", "lr", "grad_norm", "consumed_tokens", "tokens_per_sec", "tokens_per_sec_per_gpu",
            "model_tflops_per_gpu", "mfu", "stage"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def test_torchrun_trains_and_logs_metrics(tmp_path, store):
    cfg = tiny_config(tmp_path, store)
    proc = torchrun(1, ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=30"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert REQUIRED <= set(rows[0])
    assert rows[-1]["consumed_tokens"] == 30 * 8 * 32
    assert rows[0]["mfu"] is None  # CPU: peak unknown
    assert rows[-1]["stage"] == "arith"
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.7, (first, last)  # ln(256) = 5.5 at the start; the progressions are learnable
    assert rows[1]["lr"] == pytest.approx(3e-3) and rows[0]["lr"] == pytest.approx(1.5e-3)


def test_document_masking_counts_fewer_attention_flops(tmp_path, store):
    """The store's documents (20-120 tokens, EOS 0) split the 32-token windows: with document masking the logged
    model FLOPs per token are below whole-window causal attention's, above the matmuls alone."""
    from nanotronix.config import load_config
    from nanotronix.train.flops import flops_per_token, matmul_params

    cfg_path = tiny_config(tmp_path, store)
    proc = torchrun(1, ["-m", "nanotronix.train", "--config", str(cfg_path), "train.train_steps=3",
                        "model.document_mask_eos_id=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_config(str(cfg_path), []).model
    for row in map(json.loads, (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()):
        per_token = row["model_tflops_per_gpu"] * 1e12 / row["tokens_per_sec_per_gpu"]
        assert 6 * matmul_params(m) < per_token < flops_per_token(m, 32) * (1 - 1e-3), row["step"]


@pytest.mark.parametrize("override, message", [
    (["model.hidden_sise=64"], "error: model.hidden_sise: unknown config key"),
    (["model.num_attention_heads=3"], "error: model.hidden_size: 64 is not divisible by model.num_attention_heads=3"),
    (["parallel.tp=2"], "error: parallel: world size 1 is not divisible by tp*pp = 2*1"),
    (["data.stages.0.datasets.0.path=/nonexistent/store"], "/nonexistent/store"),
])
def test_bad_input_is_one_line(tmp_path, store, override, message):
    cfg = tiny_config(tmp_path, store)
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), *override])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_missing_config_file(tmp_path):
    proc = run(["-m", "nanotronix.train", "--config", str(tmp_path / "missing.yaml")])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'}"
