#!/usr/bin/env python
"""Plot a run's metrics.jsonl: loss (and validation loss), learning rate, throughput and per-source consumed tokens
against the step, with the data-stage boundaries marked. One PNG, what people look at instead of reading logs.

    python tools/plot_run.py LOG_DIR [--output PNG|SVG|PDF] [--title TEXT]

LOG_DIR is the run's logging.dir (the folder holding metrics.jsonl) or the metrics.jsonl file itself; the PNG goes
to LOG_DIR/run.png unless --output says otherwise, and appears only when complete. A run that resumed from an
earlier checkpoint logs some steps twice: a record of step s drops the records of steps >= s written before it (they
belong to the run that was abandoned: after tools/rollback.py its logged steps beyond the new run's progress, too).
Lines end at a line feed alone (JSON Lines: a carriage return is JSON whitespace). A line that is no JSON object with
an integer "step" in [0, 2^53] (a truncated line: a job killed while writing; a full disk's cut line; a hand edit) is
skipped, and their count said in one warning; values that are no numbers (null, strings, true) are left out of the
curves, NaN leaves a gap.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import ArgumentParser, one_line_errors, replace_file, user_path
from nanotronix.errors import fail


class PlotError(Exception):
    """Bad input, reported as one line."""


MAX_STEP = 2 ** 53  # the largest step a float (the axes' numbers) holds exactly


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="tools/plot_run.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", type=user_path, metavar="LOG_DIR",
                        help="the run's logging.dir (or its metrics.jsonl)")
    parser.add_argument("--output", "-o", type=user_path, metavar="PNG",
                        help="output file, .png, .svg or .pdf (default LOG_DIR/run.png)")
    parser.add_argument("--title", help="figure title (default: the run's name: LOG_DIR's, or its parent's when "
                        "LOG_DIR is RUN_DIR/logs as in the Slurm recipes)")
    return parser.parse_args(argv)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of the run that went on, in step order (see the module docstring); and the number of unreadable
    lines."""
    try:
        return _read_records(path)
    except OSError as e:  # an I/O error on the file's disk: the file named (the read's error names none)
        raise PlotError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    kept: list[dict[str, Any]] = []  # increasing steps
    bad = 0
    # Lines end at "\n" alone, as JSON Lines says ("\r" is JSON whitespace, a stray one no line end); bytes that are
    # not UTF-8 read as U+FFFD: their line may be unreadable, not the file
    with path.open(errors="replace", newline="\n") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            step = record_step(record)
            if step is None:
                bad += 1
                continue
            while kept and kept[-1]["step"] >= step:  # a resume from an earlier step: what followed it is gone
                kept.pop()
            record["step"] = step
            kept.append(record)
    return kept, bad


def is_number(value: Any) -> bool:
    """A JSON number: true and false are no loss of 1 and 0 (a hand-edited record)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_step(record: Any) -> Optional[int]:
    """The step of a line's JSON value, or None where it is no record: an object whose "step" is an integer (or a
    float of an integral value) in [0, MAX_STEP]. A step of true, "3" or 2.5 (a hand edit, a damaged line) is no
    step: read as a number it would drop the records written before it as an abandoned run's."""
    step = record.get("step") if isinstance(record, dict) else None
    if not is_number(step):
        return None
    if isinstance(step, float) and not (math.isfinite(step) and step.is_integer()):
        return None
    return int(step) if 0 <= step <= MAX_STEP else None  # no run counts that far; an axis cannot hold it


def stage_boundaries(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(first logged step, name) of every stage after the first."""
    out = []
    for prev, cur in zip(records, records[1:]):
        if cur.get("stage") is not None and cur.get("stage") != prev.get("stage"):
            out.append((int(cur["step"]), str(cur["stage"])))
    return out


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def store_series(records: list[dict[str, Any]], key: str, pick) -> dict[str, tuple[list[int], list[float]]]:
    """Per-store series of a record field that maps store names to values (`pick` takes the number out of one)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        by_store = r.get(key)
        if not isinstance(by_store, dict):  # absent, or not a mapping of store names (a hand-edited record)
            continue
        for name, stats in by_store.items():
            value = pick(stats)
            if is_number(value):
                steps, values = out.setdefault(name, ([], []))
                steps.append(r["step"])
                values.append(value)
    return out


def source_labels(names: list[str]) -> dict[str, str]:
    """Short legend labels: the store's file name, or more of its path where two names collide."""
    labels = {n: os.path.basename(n.rstrip("/")) or n for n in names}
    if len(set(labels.values())) < len(labels):
        labels = {n: n for n in names}
    return labels


def plot_run(metrics_path: Path, output: Path, title: str) -> dict[str, Any]:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    # The title (--title, or the run folder's name), stage names and store paths are drawn as written: a "$" pair in
    # one (--title '$$', a run named run$1$) is no mathtext to parse (matplotlib's parser raised a ValueError).
    # A value near the float's limit (an lr of 1e308 in a hand-edited record) overflows inside matplotlib's tick
    # arithmetic: numpy's warnings of it (lines of matplotlib's source on stderr) are not the user's to read; the
    # figure is drawn, or the values are refused in one line.
    # A folder name that is not UTF-8 (Python holds its bytes as lone surrogates) cannot be drawn: shown with U+FFFD.
    title = title.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    with matplotlib.rc_context({"text.parse_math": False}), np.errstate(all="ignore"):
        return _draw_and_save(metrics_path, output, title)


def _draw_and_save(metrics_path: Path, output: Path, title: str) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    records, bad = read_metrics(metrics_path)
    if not records:
        raise PlotError(f"{metrics_path}: no metrics records")
    boundaries = stage_boundaries(records)
    sources = store_series(records, "datasets", lambda stats: stats.get("consumed_tokens")
                           if isinstance(stats, dict) else None)

    fig, axes = plt.subplots(2, 2, figsize=(14, 9), sharex=True)
    try:  # closed on every path: a caller that imports plot_run and calls it again must not pile up open figures
        try:
            drawn = _draw(fig, axes, records, boundaries, sources, title)
        except (OverflowError, ValueError) as e:  # values matplotlib cannot lay out (a loss of 1e308 in a record)
            raise PlotError(f"{metrics_path}: its values cannot be drawn ({e})") from None
        replace_file(output, lambda temp: fig.savefig(temp, dpi=100, format=output.suffix[1:].lower()),
                     suffix=output.suffix)
    finally:
        plt.close(fig)
    return {"output": str(output), "records": len(records), "skipped_lines": bad,
            "first_step": records[0]["step"], "last_step": records[-1]["step"],
            "stage_boundaries": boundaries, "sources": sorted(sources), **drawn}


# The held-out stores' curves: matplotlib's own cycle starts with the training curve's blue and holds the mean's
# purple and the skipped updates' red, which made the first store read as the training loss.
STORE_COLOURS = ("tab:green", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def _draw(fig, axes, records: list[dict[str, Any]], boundaries: list[tuple[int, str]],
          sources: dict[str, tuple[list[int], list[float]]], title: str) -> dict[str, Any]:
    """The four panels of `fig`; returns what the summary says of the validations and skipped updates."""
    (ax_loss, ax_lr), (ax_speed, ax_data) = axes
    ax_loss.plot(*series(records, "loss"), lw=1, color="tab:blue", label="training")
    val_steps, val_loss = series(records, "val_loss")  # validation.interval > 0
    val_stores = store_series(records, "val_losses", lambda value: value)
    if val_loss:
        ax_loss.plot(val_steps, val_loss, lw=1.2, marker="o", ms=3, color="tab:purple", label="validation")
        if len(val_stores) > 1:  # each held-out store, next to their mean
            names = source_labels(sorted(val_stores))
            for i, name in enumerate(sorted(val_stores)):
                ax_loss.plot(*val_stores[name], lw=0.8, ls="--", marker=".", label=f"validation: {names[name]}",
                             color=STORE_COLOURS[i % len(STORE_COLOURS)])
        ax_loss.legend(fontsize=8, loc="upper right")
    spikes = [(r["step"], r["loss"]) for r in records if r.get("update_skipped") and isinstance(r.get("loss"), float)]
    if spikes:  # steps whose update the spike guard skipped (train.spike_skip_sigma)
        ax_loss.plot(*zip(*spikes), ls="none", marker="x", ms=7, color="tab:red", label="update skipped (spike)")
        ax_loss.legend(fontsize=8, loc="upper right")
    ax_loss.set_ylabel("loss")
    ax_lr.plot(*series(records, "lr"), lw=1, color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    steps, rate = series(records, "tokens_per_sec_per_gpu")
    ax_speed.plot(steps, rate, lw=1, color="tab:green", label="tokens/s/GPU")
    ax_speed.set_ylabel("tokens/s per GPU")
    mfu_steps, mfu = series(records, "mfu")
    if mfu:
        ax_mfu = ax_speed.twinx()
        ax_mfu.plot(mfu_steps, [100 * x for x in mfu], lw=1, color="tab:red", alpha=0.6)
        ax_mfu.set_ylabel("MFU %", color="tab:red")
    labels = source_labels(sorted(sources))
    for name in sorted(sources):
        ax_data.plot(*sources[name], lw=1.2, label=labels[name])
    ax_data.set_ylabel("consumed tokens per source")
    if sources:
        ax_data.legend(fontsize=8, loc="upper left")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for step, name in boundaries:
            ax.axvline(step, color="gray", ls="--", lw=0.8)
    for step, name in boundaries:  # stage names once, along the top
        ax_loss.annotate(name, xy=(step, 1), xycoords=("data", "axes fraction"), rotation=90, va="top",
                         ha="right", fontsize=8, color="gray")
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return {"validations": len(val_loss), "validation_stores": sorted(val_stores),
            "skipped_updates": [step for step, _ in spikes]}


def default_title(log_folder: Path) -> str:
    """The run's name: the log folder's, or its run folder's where it is the recipes' RUN_DIR/logs (every such
    figure was titled "logs")."""
    folder = log_folder.resolve()
    return folder.parent.name if folder.name == "logs" and folder.parent.name else folder.name


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    log_dir = Path(args.log_dir)
    metrics = log_dir if log_dir.is_file() else log_dir / "metrics.jsonl"
    try:
        if not metrics.is_file():  # a folder or a pipe where the file should be is no file to read
            raise PlotError(f"{metrics}: not a file" if metrics.exists() else f"no metrics.jsonl in {log_dir}")
        output = Path(args.output) if args.output else metrics.parent / "run.png"
        if output.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise PlotError(f"--output {output}: name a .png, .svg or .pdf file (its suffix picks the format)")
        summary = plot_run(metrics, output, args.title or default_title(metrics.parent))
    except (PlotError, OSError) as e:
        return fail(e)
    if summary["skipped_lines"]:
        print(f"warning: skipped {summary['skipped_lines']} unreadable line(s) of {metrics}", file=sys.stderr)
    marks = ", ".join(f"{name} at step {step}" for step, name in summary["stage_boundaries"]) or "none"
    print(f"wrote {summary['output']}: steps {summary['first_step']}-{summary['last_step']} "
          f"({summary['records']} records, {summary['validations']} with a validation loss over "
          f"{len(summary['validation_stores'])} store(s)), "
          f"{len(summary['sources'])} source(s), stage switches: {marks}"
          + (f", updates skipped by the spike guard at steps {summary['skipped_updates']}"
             if summary["skipped_updates"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
