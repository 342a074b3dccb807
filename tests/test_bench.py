"""tools/bench_train.py on CPU with a tiny model: the whole CLI (baseline + two nanotronix runs, JSON report),
its one-line errors, and that a finished run frees its model (later runs must not measure leftovers).
Costs ~15 s."""
import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_train  # noqa: E402

TINY = ["model.preset=smollm2-135m", "model.num_hidden_layers=2", "model.hidden_size=64",
        "model.intermediate_size=96", "model.num_attention_heads=4", "model.num_key_value_heads=2",
        "model.vocab_size=128", "train.seq_len=16", "train.micro_batch_size=3"]


def test_cli_reports_baseline_and_variants(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench_train.py"), *TINY, "--accum", "2",
                           "--warmup", "1", "--steps", "2", "--variant", "plain:",
                           "--variant", "fused:train.fused_kernels=true,train.loss_chunk_size=5",
                           "--variant", "mb6:train.micro_batch_size=6",
                           "--profile", "fused", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["hf-transformers", "plain", "fused", "mb6"]
    # tokens per step = accum x micro-batch x seq, for a run with its own micro-batch size too
    for r, micro in zip(report["results"], [3, 3, 3, 6]):
        per_step = r["tokens_per_sec_per_gpu"] * sum(r["step_seconds"]) / len(r["step_seconds"])
        assert per_step == pytest.approx(2 * micro * 16), r["name"]
    assert report["accum"] == 2 and report["micro_batch_size"] == 3 and report["seq_len"] == 16
    for r in report["results"]:
        assert r["ok"] and r["tokens_per_sec_per_gpu"] > 0 and len(r["step_seconds"]) == 2
        assert len(r["losses"]) == 3 and r["ratio_to_baseline"] > 0
        assert r["mfu"] is None  # no known peak on a CPU
    # same init and batches: nanotronix's first loss is transformers' first loss (same init std, fp32 on CPU)
    plain, fused = report["results"][1]["losses"], report["results"][2]["losses"]
    assert abs(plain[0] - fused[0]) < 1e-4
    assert "hf-transformers" in proc.stdout and "vs HF" in proc.stdout
    # --profile fused: one more step of that run profiled; its time split into kernel groups (matmuls among them)
    shares = report["results"][2]["time_shares"]
    assert report["results"][1]["time_shares"] is None and len(report["results"][2]["losses"]) == 3
    assert sum(shares.values()) == pytest.approx(1.0) and shares["matmul"] > 0
    assert "[fused] profile of one step" in proc.stdout and "by group:" in proc.stdout


def test_a_run_with_its_own_micro_batch_size_trains_batches_of_that_size(monkeypatch):
    """What each run's steps are handed (before: the base micro-batch, while its throughput counted its own)."""
    shapes = {}
    measure = bench_train.measure

    def recording(name, build, cfg, device, batches, *args, **kwargs):
        shapes[name] = tuple(batches[0].shape)
        return measure(name, build, cfg, device, batches, *args, **kwargs)

    monkeypatch.setattr(bench_train, "measure", recording)
    assert bench_train.main([*TINY, "--accum", "2", "--warmup", "1", "--steps", "1", "--no-baseline",
                             "--variant", "plain:", "--variant", "mb6:train.micro_batch_size=6",
                             "--variant", "seq8:train.seq_len=8", "--variant", "v64:model.vocab_size=64"]) == 0
    assert shapes == {"plain": (2, 3, 17), "mb6": (2, 6, 17), "seq8": (2, 3, 9), "v64": (2, 3, 17)}


def test_a_diverging_run_is_a_failed_row_and_the_next_runs(monkeypatch, capsys):
    """A run whose loss is not finite is reported as failed, and the runs after it still run (before: a
    FloatingPointError traceback ended the benchmark)."""
    real = bench_train.nanotronix_step_fn
    calls = []

    def diverging(cfg, device):
        inner = real(cfg, device)
        calls.append(cfg)

        def step(batch):
            loss = inner(batch)
            return float("nan") if len(calls) == 1 else loss
        step.model = inner.model
        return step

    monkeypatch.setattr(bench_train, "nanotronix_step_fn", diverging)
    assert bench_train.main([*TINY, "--warmup", "1", "--steps", "1", "--no-baseline", "--variant", "a:",
                             "--variant", "b:"]) == 1
    table = capsys.readouterr().out.split("tokens/s/GPU")[-1]
    assert "a                        FloatingPointError: loss is nan at step 1" in table and len(calls) == 2
    assert "\nb " in table and "b                        FloatingPointError" not in table


def test_cli_bad_input_is_one_line_error():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench_train.py"), *TINY, "--variant", "nocolon"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --variant") and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench_train.py"), *TINY, "train.recompute=most"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.recompute" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench_train.py"), *TINY, "--profile", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --profile nope: no run of that name")


def test_measure_frees_the_model():
    args = bench_train.parse_args([*TINY, "--steps", "1", "--warmup", "0"])
    device = torch.device("cpu")
    cfg = bench_train.build_config(args, [], device)
    batches = bench_train.make_batches(cfg, 1, 1)
    refs = []

    def build():
        step = bench_train.nanotronix_step_fn(cfg, device)
        # the model, and what it owns that hooks living in C++ could keep alive: its buffers and weights
        refs.extend(weakref.ref(t) for t in (step.model, step.model.grads, step.model.grads.buckets[0].data,
                                             next(step.model.parameters())))
        return step
    result = bench_train.measure("x", build, cfg, device, batches, 0, [])
    gc.collect()
    assert result.ok and [r() for r in refs] == [None] * 4


@pytest.mark.parametrize("error", [RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore detail"),
                                   KeyError("CUPTI_ERROR_NOT_INITIALIZED")], ids=["cupti", "parsing"])
def test_a_failing_profile_keeps_the_runs_timings(monkeypatch, capsys, error):
    """The profiled step is an extra: when the profiler fails (on a GPU: CUPTI unavailable, out of memory, the
    parsing of a CUDA profile, which no CPU run makes), the run's timed steps still count."""
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(bench_train, "profile_step", broken)
    args = bench_train.parse_args([*TINY, "--steps", "2", "--warmup", "1"])
    device = torch.device("cpu")
    cfg = bench_train.build_config(args, [], device)
    result = bench_train.measure("x", lambda: bench_train.nanotronix_step_fn(cfg, device), cfg, device,
                                 bench_train.make_batches(cfg, 2, 1), 1, [], profile=True)
    assert result.ok and len(result.step_seconds) == 1 and result.time_shares is None
    said = f"[x] profile failed, timings kept: {type(error).__name__}: {str(error).splitlines()[0]}"
    assert said in capsys.readouterr().out


@pytest.mark.parametrize("error", [TypeError("addmm() got an unexpected keyword argument 'out_dtype'"),
                                   AssertionError("unexpected stride")], ids=["type", "assertion"])
def test_a_run_failing_in_any_way_is_reported_and_the_next_runs(error):
    """A CUDA-only path that fails on the GPU machine's torch (no CPU run takes it) ends its run with the error in its
    row, not the whole benchmark: the runs after it, and the GPU session's one try, go on."""
    def failing(batch):
        raise error

    args = bench_train.parse_args([*TINY, "--steps", "1", "--warmup", "0"])
    cfg = bench_train.build_config(args, [], torch.device("cpu"))
    batches = bench_train.make_batches(cfg, 1, 1)
    result = bench_train.measure("x", lambda: failing, cfg, torch.device("cpu"), batches, 0, [])
    assert not result.ok and result.error == f"{type(error).__name__}: {error}"
    assert bench_train.measure("y", lambda: (lambda batch: 1.0), cfg, torch.device("cpu"), batches, 0, []).ok


def test_documents_plants_eos_at_the_mean_length():
    args = bench_train.parse_args([*TINY, "--documents", "7:4"])
    cfg = bench_train.build_config(args, [], torch.device("cpu"))
    batches = bench_train.make_batches(cfg, 20, 2, args.documents)
    eos = sum(int((b == 7).sum()) for b in batches) / sum(b.numel() for b in batches)
    assert abs(eos - 1 / 4) < 0.03  # ~1 in 4 tokens (plus the 1/128 random draws of 7)
    plain = bench_train.make_batches(cfg, 20, 2)
    assert sum(int((b == 7).sum()) for b in plain) / sum(b.numel() for b in plain) < 0.02
    with pytest.raises(SystemExit):
        bench_train.parse_args([*TINY, "--documents", "7"])


def test_documents_eos_outside_the_vocabulary_and_the_baselines_flops(capsys):
    """--documents with an EOS id past the vocabulary: one line (an IndexError in the embedding before). Under
    model.document_mask_eos_id, the nanotronix run's FLOPs count attention within documents, the baseline's (which
    masks nothing) full causal attention."""
    from nanotronix.train.flops import document_attention_span, flops_per_token

    assert bench_train.main([*TINY, "--documents", "500:4"]) == 2
    assert capsys.readouterr().err.strip() == "error: --documents 500:4: the EOS id is outside the vocabulary (128)"
    args = bench_train.parse_args([*TINY, "model.document_mask_eos_id=7", "--documents", "7:4"])
    cfg = bench_train.build_config(args, [], torch.device("cpu"))
    batches = bench_train.make_batches(cfg, 2, 1, args.documents)
    per_token = {}
    for masks in (True, False):
        r = bench_train.measure("x", lambda: (lambda batch: 1.0), cfg, torch.device("cpu"), batches, 0, [],
                                masks_documents=masks)
        per_token[masks] = r.tflops_per_gpu * 1e12 / r.tokens_per_sec_per_gpu
    span = sum(document_attention_span(b[..., :-1], 7) for b in batches) / len(batches)
    assert per_token[True] == pytest.approx(flops_per_token(cfg.model, 16, span))
    assert per_token[False] == pytest.approx(flops_per_token(cfg.model, 16))
    assert per_token[False] > per_token[True]


def args_of(config, *overrides: str) -> list[str]:
    return ["--config", str(config), *TINY[:-2], *overrides, "--accum", "3"]


def test_a_config_file_sets_the_micro_batch(tmp_path):
    """--config with its own micro_batch_size (the quickstart's is 4): the global batch follows it (before, only an
    override's was read, and validation refused micro-batch 4 against a global batch of 1 x --accum)."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"micro_batch_size": 5, "seq_len": 16}}))
    args = bench_train.parse_args(args_of(config))
    cfg = bench_train.build_config(args, [], torch.device("cpu"))
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (5, 15)
    assert cfg.train.dtype == "float32"  # the device's, where the file names none
    # the file's own dtype: the device's default, put among the overrides, beat it (a bf16 recipe ran in fp32)
    config.write_text(yaml.safe_dump({"train": {"micro_batch_size": 5, "seq_len": 16, "dtype": "bfloat16"}}))
    assert bench_train.build_config(args, [], torch.device("cpu")).train.dtype == "bfloat16"
    assert bench_train.build_config(bench_train.parse_args(args_of(config, "train.dtype=float32")), [],
                                    torch.device("cpu")).train.dtype == "float32"  # an override still beats it


def test_gpu_checks_benchmarks_are_valid_runs():
    """Every `bench` line of tools/gpu_checks.sh, expanded by bash as the script does, parses and gives valid
    configs for its baseline and each variant (as on a GPU: bf16), and its --profile names are runs: a typo there
    would otherwise be found only on the lent GPU machine, whose time is short."""
    import re

    script = (ROOT / "tools" / "gpu_checks.sh").read_text().replace("\\\n", " ")
    assignments = [line.strip() for line in script.splitlines() if re.match(r"^\s*[A-Z][A-Z0-9_]*=\S+$", line)]
    calls = [m.group(1) for m in re.finditer(r"^\s*(?:BENCH_MIN=\d+ )?bench (\S+ \S+ .*)$", script, re.MULTILINE)]
    assert len(calls) >= 6 and assignments, (len(calls), assignments)
    expand = "\n".join(assignments + [f"printf '%s\\n' {call}; echo '<end>'" for call in calls])
    words = subprocess.run(["bash", "-c", expand], capture_output=True, text=True, check=True).stdout.split("\n")
    cuda = torch.device("cuda")  # build_config only reads its type (the default dtype): nothing runs on it
    checked = 0
    while "<end>" in words:
        end = words.index("<end>")
        name, timeout, *argv = words[:end]
        assert int(timeout) > 0, name
        words = words[end + 1:]
        args = bench_train.parse_args(argv)
        variants = [bench_train.parse_variant(v) for v in args.variant]
        configs = [bench_train.build_config(args, extra, cuda) for _, extra in [("base", [])] + variants]
        assert all(c.train.dtype == "bfloat16" for c in configs), name
        assert set(args.profile) <= {v for v, _ in variants} | {"hf-transformers"}, (name, args.profile)
        checked += 1 + len(variants)
    assert checked >= 15


@pytest.mark.parametrize("part", ["1", "2"])
def test_gpu_checks_skip_what_the_device_call_has_no_time_for(tmp_path, part):
    """CALL_S is the device call's time: a step that no longer fits is skipped with a line, not started and then
    killed with the call (which loses the summary). With 20 s, every step of either part is skipped at once; the
    device's Python is not needed for that (PY=true)."""
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "CALL_S": "20", "PY": "true", "TRAIN_DEVICE": "cpu"}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_checks.sh"), part], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    skipped = [line for line in (proc.stdout + proc.stderr).splitlines() if "skipped (" in line]
    names = {"1": ["csrc build", "GPU tests", "bench 360m", "bench 135m", "bench 1p7b"],
             "2": ["bench 1p7b_autotune", "bench 1p7b_profile", "GPU tests", "bench 1p7b_docmask",
                   "checkpoint bench", "trainer on CUDA"]}[part]
    for name in names:
        assert any(name in line for line in skipped), (name, skipped)
    assert not list(tmp_path.glob("bench_*"))


@pytest.mark.parametrize("part, code", [("--help", 0), ("3", 2)])
def test_gpu_checks_help_or_a_bad_part_makes_no_output_folder(tmp_path, part, code):
    """`--help` is the usage line (exit 0), an unknown part one `error:` line (exit 2); neither leaves an empty
    OUT folder behind (it was made before the part was read)."""
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "PY": "true"}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_checks.sh"), part], env=env, capture_output=True,
                          text=True, timeout=60)
    said = (proc.stdout if code == 0 else proc.stderr).splitlines()
    assert proc.returncode == code and len(said) == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert said[0].startswith("usage: " if code == 0 else "error: "), said
    assert not out.exists()


def test_gpu_checks_part_2_after_part_1_skips_the_autotuning_it_cannot_finish(tmp_path):
    """Part 2 right after part 1 in a 15-minute device session has a few minutes: the autotuned 1.7B bench (minutes
    of compiling before its first step) is skipped rather than started and killed, and the steps after it run. (90 s:
    short enough that the trainer step, whose folder is a fixed /tmp path, is skipped too.)"""
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "CALL_S": "90", "PY": "true", "TRAIN_DEVICE": "cpu"}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_checks.sh"), "2"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if "skipped (" in line and "bench 1p7b_autotune" in line], lines
    assert not [line for line in lines if "] bench 1p7b_autotune" in line], lines
    assert [line for line in lines if "] bench 1p7b_profile" in line], lines
