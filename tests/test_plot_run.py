"""tools/plot_run.py on a metrics.jsonl shaped like a resumed multi-stage run (~5 s)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import run
from nanotronix.errors import UserError


def record(step: int, stage: str, loss: float) -> dict:
    a = step * 300 if stage == "web" else 3000 + (step - 10) * 200
    b = 0 if stage == "web" else (step - 10) * 100
    return {"step": step, "loss": loss, "lr": 1e-3 * min(1, step / 5), "grad_norm": 1.0,
            "consumed_tokens": step * 300, "tokens_per_sec": 1000.0 + step, "tokens_per_sec_per_gpu": 500.0 + step,
            "model_tflops_per_gpu": None, "mfu": None, "stage": stage,
            "datasets": {"/data/web/fineweb-edu": {"consumed_tokens": a, "epochs": a / 1e4},
                         "/data/code/stack-edu": {"consumed_tokens": b, "epochs": b / 1e4}}}


def write_resumed_run(log_dir: Path) -> None:
    """Steps 1-12, then a resume from the checkpoint of step 8 that logs 9-20 again, then a rollback to step 16 whose
    run has logged 17-18 when the plot is drawn (19-20 of the abandoned run must go); the file ends mid-line."""
    rows = [record(s, "web" if s <= 10 else "code+web", 10.0 - 0.1 * s) for s in range(1, 13)]
    rows += [record(s, "web" if s <= 10 else "code+web", 9.0 - 0.1 * s) for s in range(9, 21)]
    rows += [record(s, "code+web", 5.0 - 0.1 * s) for s in range(17, 19)]
    rows[-1]["update_skipped"] = "loss 3.2 is 7.0 sigma above the last 128 steps' (2.9 +- 0.04)"  # the spike guard
    for row in rows:
        if row["step"] % 5 == 0:  # validation.interval 5
            row["val_losses"] = {"/data/heldout/web": row["loss"] + 0.2, "/data/heldout/code": row["loss"] + 0.4}
            row["val_loss"] = row["loss"] + 0.3
    log_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "loss": 7.'
    (log_dir / "metrics.jsonl").write_text(text)


def test_plot_of_a_resumed_two_stage_run(plot_tool, tmp_path, capsys):
    log_dir = tmp_path / "logs"
    write_resumed_run(log_dir)
    records, bad = plot_tool.read_metrics(log_dir / "metrics.jsonl")
    assert bad == 1 and [r["step"] for r in records] == list(range(1, 19))
    assert records[10]["loss"] == pytest.approx(9.0 - 1.1)  # the resumed run's record of step 11 wins
    assert records[-1]["loss"] == pytest.approx(5.0 - 1.8)  # and the rolled-back run's of step 18
    assert plot_tool.main([str(log_dir)]) == 0
    out, err = capsys.readouterr()
    assert "stage switches: code+web at step 11" in out and "skipped 1 unreadable line" in err
    assert "(18 records, 3 with a validation loss over 2 store(s))" in out  # steps 5, 10, 15
    assert out.rstrip().endswith("updates skipped by the spike guard at steps [18]")
    png = log_dir / "run.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (900, 1400)
    assert image[..., :3].std() > 0.05  # something was drawn
    assert not [p for p in log_dir.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_output_option_and_errors(plot_tool, tmp_path, capsys):
    log_dir = tmp_path / "logs"
    write_resumed_run(log_dir)
    out_png = tmp_path / "figs" / "x.png"
    assert plot_tool.main([str(log_dir / "metrics.jsonl"), "--output", str(out_png), "--title", "t"]) == 0
    assert out_png.is_file()
    assert plot_tool.main([str(log_dir), "--output", str(tmp_path / "figs" / "x.svg")]) == 0
    assert (tmp_path / "figs" / "x.svg").read_text().lstrip().startswith("<?xml")  # the suffix picks the format
    capsys.readouterr()
    assert plot_tool.main([str(log_dir), "--output", str(tmp_path / "p.txt")]) == 2
    assert "name a .png, .svg or .pdf file" in capsys.readouterr().err and not (tmp_path / "p.txt").exists()
    assert plot_tool.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no metrics.jsonl in {tmp_path / 'nowhere'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plot_tool.main([str(empty)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ") and not (empty / "run.png").exists()
    # a binary file given as the metrics (the figure it wrote): one line, not a UnicodeDecodeError
    assert plot_tool.main([str(out_png), "--output", str(tmp_path / "y.png")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out_png}: no metrics records"
    # a record whose per-store fields are not mappings (hand-edited): plotted without them, not an AttributeError
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "datasets": [1], "val_losses": [2.0]}\n')
    assert plot_tool.main([str(odd)]) == 0 and (odd / "run.png").is_file()
    # an output path through a file: the output named with the reason, not the hidden temp file with an errno
    capsys.readouterr()
    assert plot_tool.main([str(log_dir), "--output", str(out_png / "z.png")]) == 2
    said = capsys.readouterr().err.strip()
    assert said == f"error: cannot write {out_png / 'z.png'} (a part of that path is a file, not a folder)", said


def test_each_loss_curve_has_a_colour_of_its_own(plot_tool, tmp_path):
    """The held-out stores' dashed curves took matplotlib's colour cycle, whose first colour is the training curve's
    blue (and whose 4th and 5th the skipped updates' red and the validation mean's purple)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    rows = [dict(record(s, "web", 3.0 - 0.01 * s)) for s in range(1, 11)]
    for row in rows[4::5]:
        row["val_losses"] = {f"/data/heldout/store{i}": row["loss"] + 0.1 * i for i in range(5)}
        row["val_loss"] = row["loss"] + 0.2
    rows[-1]["update_skipped"] = "a spike"
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig, axes = plt.subplots(2, 2)
    try:
        records, _ = plot_tool.read_metrics(tmp_path / "metrics.jsonl")
        plot_tool._draw(fig, axes, records, [], {}, "t")
        colours = {line.get_label(): to_hex(line.get_color()) for line in axes[0][0].get_lines()}
    finally:
        plt.close(fig)
    assert len(colours) == 1 + 1 + 5 + 1 and len(set(colours.values())) == len(colours), colours


def test_dollar_signs_in_the_title_stage_and_store_names_are_drawn_as_written(plot_tool, tmp_path, capsys):
    """matplotlib reads text between two "$" as mathtext: a title, stage or store name holding them (--title '$$', a
    run folder named cost$1$) is drawn as written, not a ValueError from its parser."""
    log_dir = tmp_path / "run$1$" / "logs"
    log_dir.mkdir(parents=True)
    rows = [dict(record(s, "web", 3.0), stage="$web$", datasets={"/data/$a$": {"consumed_tokens": s}})
            for s in (1, 2, 3)]
    rows[2]["stage"] = "$\\frac{$"
    (log_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for title in (["--title", "$$"], ["--title", "$\\undefined{x}$"], []):
        assert plot_tool.main([str(log_dir), "--output", str(tmp_path / "p.png"), *title]) == 0, capsys.readouterr()
        assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_folder_named_in_bytes_that_are_not_utf8_is_drawn(plot_tool, tmp_path, capsys):
    """A run folder whose name is not UTF-8 (Python's lone surrogates for its bytes) as the default title: matplotlib
    raised a TypeError (a traceback); it is drawn with U+FFFD for the bytes."""
    log_dir = tmp_path / os.fsdecode(b"run\xff") / "logs"
    log_dir.mkdir(parents=True)
    (log_dir / "metrics.jsonl").write_text("".join(json.dumps(record(s, "web", 3.0)) + "\n" for s in (1, 2)))
    assert plot_tool.main([str(log_dir), "--output", str(tmp_path / "p.png")]) == 0, capsys.readouterr()
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_draw_that_fails_leaves_no_figure_open(plot_tool, tmp_path):
    """plot_run imported and called in-process (as these tests and the CLI property tests do): a figure whose drawing
    fails (losses of +-1e308, whose range matplotlib's ticks overflow) or whose saving fails (an output path through a
    file) is closed all the same, so that repeated calls do not pile up open figures."""
    import matplotlib.pyplot as plt

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 1e308}\n{"step": 2, "loss": -1e308}\n')
    through_a_file = tmp_path / "file.png"
    through_a_file.write_bytes(b"")
    before = plt.get_fignums()
    with pytest.raises(plot_tool.PlotError, match="its values cannot be drawn"):
        plot_tool.plot_run(metrics, tmp_path / "run.png", "t")
    assert plt.get_fignums() == before and not (tmp_path / "run.png").exists()
    metrics.write_text('{"step": 1, "loss": 3.0}\n')
    with pytest.raises(UserError, match="a part of that path is a file"):
        plot_tool.plot_run(metrics, through_a_file / "run.png", "t")
    assert plt.get_fignums() == before


def test_steps_and_values_no_axis_can_hold_are_one_line(plot_tool, tmp_path, capsys):
    """A hand-edited or damaged metrics.jsonl: a step of 400 digits, a negative one or an infinite one is an
    unreadable line (skipped with the warning), and losses matplotlib cannot lay out are one line, exit 2 (both
    were tracebacks: OverflowError converting the step to a float, ValueError from the ticks' arange)."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    metrics = log_dir / "metrics.jsonl"
    metrics.write_text(f'{{"step": 1, "loss": 3.0}}\n{{"step": {10**400}, "loss": 2.0}}\n{{"step": -4, "loss": 1}}\n'
                       '{"step": Infinity, "loss": 1}\n{"step": 2, "loss": 2.5}\n')
    assert plot_tool.main([str(log_dir)]) == 0
    said = capsys.readouterr()
    assert said.err.strip() == f"warning: skipped 3 unreadable line(s) of {metrics}"
    assert said.out.startswith(f"wrote {log_dir / 'run.png'}: steps 1-2 (2 records")
    metrics.write_text('{"step": 1, "loss": 1e308}\n{"step": 2, "loss": -1e308}\n')
    (log_dir / "run.png").unlink()
    assert plot_tool.main([str(log_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {metrics}: its values cannot be drawn (")
    assert not (log_dir / "run.png").exists()


def test_the_default_title_names_the_run(plot_tool, tmp_path):
    """The Slurm recipes log to RUN_DIR/logs: the figure is titled by the run, not "logs"."""
    assert plot_tool.default_title(tmp_path / "runs" / "smollm2-1.7b" / "logs") == "smollm2-1.7b"
    assert plot_tool.default_title(tmp_path / "my_run") == "my_run"


def test_cli_help():
    proc = run(["tools/plot_run.py", "--help"])
    assert proc.returncode == 0 and "LOG_DIR" in proc.stdout


def test_a_stage_switch_between_two_logged_steps_is_drawn_where_the_stage_starts(plot_tool, tmp_path, capsys):
    """logging.interval 3 and a stage from step 4: the trainer logged steps 3 and 6, and plot_run drew the switch at
    6, where its per-source curves bend at 4. A stage's first step is now always logged, and the switch is drawn
    there; skipped-step records carry every field of a trained one (null), data wait and peak memory included."""
    from checkpoint_helpers import train_in_process
    from helpers import tiny_config, write_learnable_store

    store = write_learnable_store(tmp_path / "arith")
    cfg = tiny_config(tmp_path, store, train={"train_steps": 7}, logging={"dir": str(tmp_path / "logs"), "interval": 3})
    import yaml
    tree = yaml.safe_load(cfg.read_text())
    tree["data"]["stages"].append({"name": "later", "start_step": 4, "datasets": [{"path": "arith", "weight": 1.0}]})
    cfg.write_text(yaml.safe_dump(tree))
    train_in_process(cfg)
    records, _ = plot_tool.read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3, 4, 6, 7]
    assert plot_tool.main([str(tmp_path / "logs"), "--output", str(tmp_path / "p.png")]) == 0
    assert "stage switches: later at step 4" in capsys.readouterr().out
