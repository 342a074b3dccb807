"""tools/bench_checkpoint.py on CPU with a tiny model: both modes run through the trainer and are reported, with
their JSON, and what a rank collects per save is the checkpoint's tensors (all of them on one rank, about half on
each of two). No timing is asserted (benchmarks are not timed tests). Costs ~10 s."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_checkpoint  # noqa: E402

TINY = ["model.hidden_size=32", "model.intermediate_size=48", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=96",
        "model.max_position_embeddings=32", "train.seq_len=16", "train.micro_batch_size=2"]


def tensor_bytes(report: dict) -> int:
    """fp32 weights and AdamW's two fp32 moments of every parameter: what one save holds."""
    return report["parameters"] * 4 * 3


def test_both_modes_are_measured_and_reported(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_checkpoint.main([*TINY, "--interval", "2", "--saves", "2", "--warmup", "0", "--dir",
                                  str(tmp_path / "ckpt"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\nsync " in printed and "\nasync " in printed and "pause sync / async:" in printed
    report = json.loads(out.read_text())
    sync, background = report["modes"]["sync"], report["modes"]["async"]
    for mode in (sync, background):
        assert mode["saves"] == 2 and mode["pause_s"] > 0 and mode["write_s"] > 0
        assert mode["collected_bytes"] == tensor_bytes(report) and mode["collected_bytes_per_rank"] == [
            tensor_bytes(report)]
        assert mode["checkpoint_bytes"] > tensor_bytes(report)  # the tensors, plus metadata, RNG and manifest
    assert sync["steps_beside_write"] == 0  # sync writes inside the pause
    assert report["pause_ratio"] == sync["pause_s"] / background["pause_s"]
    assert not (tmp_path / "ckpt").exists()  # the checkpoints are removed after the run, and the folder made for them


def test_folders_made_for_dir_and_json_are_removed_on_failure_and_an_existing_dir_stays(tmp_path, capsys):
    """A bad config after the --dir and --json checks made their folders leaves none of them behind (the rule for
    every failed command); a --dir that existed before is kept, with what it held."""
    assert bench_checkpoint.main([*TINY, "train.recompute=most", "--dir", str(tmp_path / "a" / "ckpt"), "--json",
                                  str(tmp_path / "a" / "r" / "bench.json")]) == 2
    assert capsys.readouterr().err.startswith("error: train.recompute")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "note").write_text("x")
    assert bench_checkpoint.main([*TINY, "train.recompute=most", "--dir", str(tmp_path / "kept")]) == 2
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["note"]


def test_two_ranks_each_collect_about_half(tmp_path):
    """--nproc 2 (gloo, data parallel): each distinct chunk is collected by one rank, so the two ranks' bytes add up
    to one checkpoint's tensors, and neither collects much more than half (the tensors are spread by size)."""
    out = tmp_path / "bench.json"
    assert bench_checkpoint.main([*TINY, "--interval", "2", "--saves", "1", "--warmup", "0", "--nproc", "2",
                                  "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for mode in report["modes"].values():
        per_rank = mode["collected_bytes_per_rank"]
        assert sum(per_rank) == tensor_bytes(report) and max(per_rank) < 0.6 * tensor_bytes(report), per_rank


def test_bad_input_is_one_line(capsys):
    assert bench_checkpoint.main([*TINY, "train.recompute=most"]) == 2
    assert capsys.readouterr().err.startswith("error: train.recompute")


def test_a_preset_replaces_the_default_model(tmp_path):
    """`model.preset=...` benchmarks that model, not the default one (whose explicit fields would win over a preset)."""
    from nanotronix.config import load_config

    args = bench_checkpoint.parse_args(["model.preset=smollm2-360m", "model.num_hidden_layers=2"])
    cfg = bench_checkpoint.mode_config(bench_checkpoint.build_tree(args, "cpu"), tmp_path, "sync", False, 5)
    assert cfg.model == load_config(None, ["model.preset=smollm2-360m", "model.num_hidden_layers=2"]).model


def test_the_gpu_checks_run_is_a_valid_benchmark(tmp_path):
    """tools/gpu_checks.sh's bench_checkpoint line, expanded by bash as the script does, parses and gives a valid
    config (as on a GPU: bf16): a typo there would otherwise be found only on the lent GPU machine."""
    import re
    import subprocess

    script = (ROOT / "tools" / "gpu_checks.sh").read_text().replace("\\\n", " ")
    calls = re.findall(r"tools/bench_checkpoint\.py (.*?)(?:>>|$)", script, re.MULTILINE)
    assert len(calls) == 1, calls
    argv = subprocess.run(["bash", "-c", f"printf '%s\\n' {calls[0]}"], capture_output=True, text=True,
                          check=True).stdout.split()
    args = bench_checkpoint.parse_args(argv)
    cfg = bench_checkpoint.mode_config(bench_checkpoint.build_tree(args, "cuda"), tmp_path, "async", True,
                                       args.interval)
    assert cfg.train.dtype == "bfloat16" and cfg.checkpoint.async_save
    assert args.saves >= 3  # the median pause leaves out the first async save's allocation of its host buffers
