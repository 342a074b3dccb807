"""Property-based tests (hypothesis, configured in tests/properties.py) of every reader of a run's metrics.jsonl in the
states real files get into (README, "Where the numbers go"; tools/plot_run.py's docstring), and of the writer that a
resume appends with.

The files are real: two runs of the trainer, made once per module. Run A trains steps 1-3 (checkpoint at 2); run B
resumes from A's step 2 with another config (validation on, step 4 skipped, a second stage reading a second store from
step 4) into a logging.dir holding A's metrics.jsonl cut mid-line, as a job killed while writing leaves it. The edits
drawn on them: a node dying mid-write (the file cut anywhere), a disk filling (a line cut short, then later lines), a
crash leaving NUL bytes, bytes that are not UTF-8, CRLF line ends, blank lines, files concatenated (with or without
the first one's last line end), two runs' records in one file, records of other shapes (not objects, without a step,
fields deleted, given NaN, Infinity, null, strings, booleans, numbers no axis holds), steps going backwards (a rollback
then a resume), lines duplicated or swapped; then perhaps a resume that appends run B's records through the writer.

The readers and what they must do, against a plain reading of the JSON Lines written below (`plain_records`):
- tools/plot_run.py (in this process): exit 0 with a PNG whose drawn points are exactly the kept records' (a record of
  step s drops the records of steps >= s before it; a line that is not a JSON object with an integer step in
  [0, 2^53] is skipped, and their count said in one warning), or, where no record is kept or a value is too large to
  lay out, exit 2 with ONE `error: METRICS: ...` line and no PNG; nothing else written beside the file, no traceback,
  no Python warning;
- the trainer's start (nanotronix.train.metrics): earlier_records_note says the file holds records exactly when a run
  from step 0 meets a non-empty file, and a resume's records (MetricsLog.write) each land on a line of their own after
  the bytes already there, whatever those end with. ~20 s on one core."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from checkpoint_helpers import train_in_process
from helpers import tiny_config, write_learnable_store
from properties import PROPERTY

MAX_STEP = 2 ** 53  # the largest step an axis (a float) holds exactly: plot_run's documented limit
# A value no axis can lay out (its range overflows a float): plot_run may refuse the file for it
TOO_LARGE = 1e300


class Runs(dict):
    """The fixture's values, by name; shown short in hypothesis' falsifying examples."""

    def __repr__(self) -> str:
        return "runs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """The two real runs (module docstring): A's metrics.jsonl bytes, B's logging.dir file (A's records, A's last one
    cut mid-line, then B's), B's records, B's config and where A's file was cut."""
    root = tmp_path_factory.mktemp("metrics_runs")
    store = write_learnable_store(root / "arith")
    write_learnable_store(root / "arith2", seed=1)
    (root / "a").mkdir()
    a = tiny_config(root / "a", store, train={"train_steps": 3},
                    checkpoint={"dir": str(root / "a" / "ckpt"), "interval": 2})
    train_in_process(a)
    a_bytes = (root / "a" / "logs" / "metrics.jsonl").read_bytes()
    cut = a_bytes.rindex(b"\n", 0, len(a_bytes) - 1) + 40  # 40 bytes into step 3's line: a write cut short
    (root / "b").mkdir()
    (root / "b" / "logs").mkdir()
    (root / "b" / "logs" / "metrics.jsonl").write_bytes(a_bytes[:cut])
    stages = [{"name": "arith", "start_step": 1, "datasets": [{"path": "arith", "weight": 1.0}]},
              {"name": "mix", "start_step": 4, "datasets": [{"path": "arith", "weight": 0.5},
                                                            {"path": "arith2", "weight": 0.5}]}]
    b = tiny_config(root / "b", store, train={"train_steps": 5, "skip_steps": ["4"]}, data={"stages": stages},
                    checkpoint={"dir": str(root / "b" / "ckpt"), "resume": str(root / "a" / "ckpt" / "step_0000002")},
                    validation={"data": ["arith", "arith2"], "interval": 1, "num_samples": 2})
    train_in_process(b)
    b_file = (root / "b" / "logs" / "metrics.jsonl").read_bytes()
    b_records = [json.loads(line) for line in b_file[cut:].splitlines() if line]
    from nanotronix.config import load_config
    return Runs(a=a_bytes, b_file=b_file, b_records=b_records, cut=cut, config=load_config(b), root=root)


def test_a_resume_after_a_cut_short_last_line_starts_its_records_on_a_line_of_their_own(runs):
    """A job killed while writing its record leaves metrics.jsonl without its last line end; the resumed run's first
    record was glued onto that cut line (one unreadable line: the resumed run's first record lost to every reader)."""
    a, b_file, cut = runs["a"], runs["b_file"], runs["cut"]
    assert b_file.startswith(a[:cut] + b"\n")
    lines = b_file[cut + 1:].splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 4, 5]
    assert [r["step"] for r in runs["b_records"]] == [3, 4, 5]


# --- the plain reading ----------------------------------------------------------------------------------------------

def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def readable_step(record) -> Optional[int]:
    """The step of a JSON value read from a line, or None where it is no record: an object whose `step` is an integer
    (written as one, or as a float with an integral value) in [0, 2^53]."""
    if not isinstance(record, dict) or not is_number(record.get("step")):
        return None
    step = record["step"]
    if isinstance(step, float) and not (math.isfinite(step) and step.is_integer()):
        return None
    return int(step) if 0 <= step <= MAX_STEP else None


def plain_records(data: bytes) -> tuple[list[dict], int]:
    """JSON Lines as written: lines end at b"\\n" (a "\\r" before it is JSON whitespace), bytes that are not UTF-8 read
    as U+FFFD; blank lines are nothing; a line that is no record (above) is unreadable; a record of step s drops the
    records of steps >= s kept before it (plot_run's docstring). The kept records, in order, and the unreadable
    lines' count."""
    kept, bad = [], 0
    for raw in data.split(b"\n"):
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):
            record = None
        step = readable_step(record)
        if step is None:
            bad += 1
            continue
        kept = [r for r in kept if r["step"] < step] + [dict(record, step=step)]
    return kept, bad


def points(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records whose `key` is a number (a curve's points)."""
    pts = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def source_points(records: list[dict]) -> list[tuple[list, list]]:
    """Each source's consumed-token series (the `datasets` mapping's entries that are objects with a number)."""
    out: dict[str, tuple[list, list]] = {}
    for r in records:
        if isinstance(r.get("datasets"), dict):
            for name, stats in r["datasets"].items():
                if isinstance(stats, dict) and is_number(stats.get("consumed_tokens")):
                    steps, values = out.setdefault(name, ([], []))
                    steps.append(r["step"])
                    values.append(stats["consumed_tokens"])
    return [out[name] for name in sorted(out)]


def boundaries(records: list[dict]) -> list[int]:
    return [cur["step"] for prev, cur in zip(records, records[1:])
            if cur.get("stage") is not None and cur.get("stage") != prev.get("stage")]


def too_large(records: list[dict]) -> bool:
    """A number drawn that no axis lays out (plot_run may refuse the file for it)."""
    def large(v) -> bool:
        try:
            return is_number(v) and math.isfinite(float(v)) and abs(float(v)) > TOO_LARGE
        except OverflowError:  # an integer past any float
            return True
    for r in records:
        values = [r.get(k) for k in ("loss", "lr", "tokens_per_sec_per_gpu", "mfu", "val_loss")]
        for field in ("datasets", "val_losses"):
            if isinstance(r.get(field), dict):
                values += [v.get("consumed_tokens") if isinstance(v, dict) else v for v in r[field].values()]
        if any(large(v) for v in values):
            return True
    return False


# --- the edits ------------------------------------------------------------------------------------------------------

OTHER_VALUES = [float("nan"), float("inf"), float("-inf"), None, "x", True, False, [], {}, 0, -1, 1e30, 1e308,
                -1e308, 10 ** 400, 2.5]
FIELDS = ["step", "loss", "lr", "grad_norm", "tokens_per_sec_per_gpu", "mfu", "stage", "datasets", "val_loss",
          "val_losses", "skipped", "update_skipped"]


@st.composite
def record_edit(draw, lines: list[bytes], how: str) -> str:
    """One line's record changed (`how`): a field deleted or given another `value`, another `step`, other fields
    `added`."""
    readable = [i for i, line in enumerate(lines) if isinstance(_json_or_none(line), dict)]
    if not readable:
        return "no record to edit"
    i = draw(st.sampled_from(readable))
    record = _json_or_none(lines[i])
    if how == "delete":
        key = draw(st.sampled_from(sorted(record) or ["step"]))
        record.pop(key, None)
    elif how == "value":
        key = draw(st.sampled_from(FIELDS))
        record[key] = copy.deepcopy(draw(st.sampled_from(OTHER_VALUES)))
    elif how == "step":  # a rollback then a resume, a hand edit, a flipped digit
        key = "step"
        record["step"] = draw(st.one_of(st.integers(0, 7), st.sampled_from(
            [-1, MAX_STEP, MAX_STEP + 1, 10 ** 30, 3.0, 2.5, "3", True, None, float("nan")])))
    else:  # another config's fields: other validation stores and sources, a skipped step
        key = draw(st.sampled_from(["val_losses", "datasets", "skipped"]))
        record[key] = {"val_losses": {"held/out": 3.5, "other": float("nan")},
                       "datasets": {"/data/x": {"consumed_tokens": 99, "epochs": 0.1}, "y": 5},
                       "skipped": True}[key]
    lines[i] = json.dumps(record).encode()
    return f"line {i}: {how} {key}: {record.get(key, 'deleted')!r:.40}"


def _json_or_none(line: bytes):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


@st.composite
def file_edit(draw, data: bytes, other: bytes) -> tuple[bytes, str]:
    """The file's bytes after one damage (module docstring) and what it was."""
    how = draw(st.sampled_from(["cut", "cut_line", "nul", "bytes", "crlf", "blank", "concat", "not_object",
                                "duplicate", "swap", "delete", "value", "value", "step", "step", "added"]))
    lines = data.split(b"\n")
    if how == "cut":  # the node died mid-write
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "cut_line":  # a full disk: a line cut short, the later ones written after it (perhaps onto it)
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        if i + 1 < len(lines) and draw(st.booleans()):
            lines[i:i + 2] = [lines[i] + lines[i + 1]]
        data = b"\n".join(lines)
    elif how == "nul":  # a crash after the size was updated, before the data: a run of NULs
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\x00" * draw(st.integers(1, 64)) + data[at + draw(st.integers(0, 64)):]
    elif how == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\x80\x80", b"\xc3", b"\xef\xbb\xbf", b"\r", b"{"])) + \
            data[at:]
    elif how == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif how == "blank":
        i = draw(st.integers(0, len(lines)))
        data = b"\n".join(lines[:i] + [draw(st.sampled_from([b"", b"  ", b"\t", b"\r"]))] + lines[i:])
    elif how == "concat":  # `cat` of two runs' files, the first one's last line end perhaps gone
        first, second = (data, other) if draw(st.booleans()) else (other, data)
        data = (first.rstrip(b"\n") if draw(st.booleans()) else first) + second
    elif how == "not_object":
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = draw(st.sampled_from([b"[1, 2]", b"3", b'"step"', b"null", b'{"loss": 2.0}', b"{}", b"[" * 5000]))
        data = b"\n".join(lines)
    elif how == "duplicate":
        i = draw(st.integers(0, len(lines) - 1))
        data = b"\n".join(lines[:i + 1] + lines[i:])
    elif how == "swap":
        i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
        data = b"\n".join(lines)
    elif how in ("delete", "value", "step", "added"):
        how = draw(record_edit(lines, how))
        data = b"\n".join(lines)
    return data, how


# --- the readers ----------------------------------------------------------------------------------------------------

def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def call_plot(plot_tool, monkeypatch, args: list[str]) -> tuple[int, str, str, list, Optional[dict]]:
    """plot_run's main(args) in this process: (exit code, stdout, stderr, the Python warnings it raised, the figure's
    drawn lines per panel: {y label: [(x, y) of each line]})."""
    drawn: dict[str, list] = {}
    draw = plot_tool._draw

    def recording_draw(fig, axes, records, bounds, sources, title):
        result = draw(fig, axes, records, bounds, sources, title)
        for ax in fig.axes:
            drawn[ax.get_ylabel()] = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines]
        return result

    monkeypatch.setattr(plot_tool, "_draw", recording_draw)
    out, err = StringIO(), StringIO()
    with warnings.catch_warnings(record=True) as raised, redirect_stdout(out), redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            code = plot_tool.main(args)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue(), [str(w.message) for w in raised], drawn or None


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x)
                                              and math.isnan(y)) for x, y in zip(a, b))


def check_plot(plot_tool, monkeypatch, folder: Path, what: str) -> str:
    """tools/plot_run.py on FOLDER's metrics.jsonl against the plain reading (module docstring); the outcome."""
    metrics = folder / "metrics.jsonl"
    kept, bad = plain_records(metrics.read_bytes())
    before = listing(folder)
    code, out, err, raised, drawn = call_plot(plot_tool, monkeypatch, [str(folder)])
    assert "Traceback" not in err and not raised, (what, err, raised)
    if code != 0:
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {metrics}: "), (what, code, err)
        assert listing(folder) == before, what  # no PNG, nothing half-written
        assert not kept or too_large(kept), (what, err, [r["step"] for r in kept])
        return "refused"
    assert kept, (what, out)
    assert listing(folder) == sorted(set(before) | {"run.png"}), what
    assert (folder / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.startswith(f"wrote {folder / 'run.png'}: steps {kept[0]['step']}-{kept[-1]['step']} "
                          f"({len(kept)} records, {len(points(kept, 'val_loss')[0])} with a validation loss"), \
        (what, out)
    assert err == (f"warning: skipped {bad} unreadable line(s) of {metrics}\n" if bad else ""), (what, err)
    nb = len(boundaries(kept))
    loss, lr, speed, data = (drawn[label] for label in ("loss", "learning rate", "tokens/s per GPU",
                                                         "consumed tokens per source"))
    for panel in (loss, lr, speed, data):  # a vertical line at each stage switch, drawn last
        assert [x for x, _ in panel[len(panel) - nb:]] == [[s, s] for s in boundaries(kept)], what
    assert same(loss[0][0], points(kept, "loss")[0]) and same(loss[0][1], points(kept, "loss")[1]), what
    val = points(kept, "val_loss")
    if val[0]:
        assert same(loss[1][0], val[0]) and same(loss[1][1], val[1]), what
    for panel, key in ((lr, "lr"), (speed, "tokens_per_sec_per_gpu")):
        assert same(panel[0][0], points(kept, key)[0]) and same(panel[0][1], points(kept, key)[1]), (what, key)
    mfu = points(kept, "mfu")
    if mfu[0]:
        x, y = drawn["MFU %"][0]
        assert same(x, mfu[0]) and same(y, [100 * v for v in mfu[1]]), what
    sources = source_points(kept)
    drawn_sources = data[:len(data) - nb]
    assert len(drawn_sources) == len(sources), what
    for (x, y), (sx, sy) in zip(sorted(drawn_sources, key=repr), sorted(sources, key=repr)):
        assert same(x, sx) and same(y, sy), what
    return "drawn"


def check_resume_append(runs, folder: Path, first_step: int) -> None:
    """The trainer's start on FOLDER: the note of a run from step 0 (and none for a resume), then the resume's records
    appended by the writer, each on a line of its own after the bytes there."""
    from nanotronix.train.metrics import MetricsLog, earlier_records_note

    cfg = copy.deepcopy(runs["config"])
    cfg.logging.dir = str(folder)
    metrics = folder / "metrics.jsonl"
    before = metrics.read_bytes()
    note = earlier_records_note(cfg, 0)
    assert (note is not None) == bool(before) and earlier_records_note(cfg, first_step - 1) is None
    log = MetricsLog(cfg, enabled=True, first_step=first_step)
    for record in runs["b_records"]:
        log.write(record)
    log.close()
    joint = b"\n" if before and not before.endswith(b"\n") else b""
    assert metrics.read_bytes() == before + joint + b"".join(json.dumps(r).encode() + b"\n"
                                                             for r in runs["b_records"])


@settings(PROPERTY, max_examples=50)  # each example renders a PNG (~0.3 s alone)
@given(data=st.data())
def test_every_reader_of_a_damaged_metrics_file(runs, plot_tool, data):
    base = data.draw(st.sampled_from(["a", "b_file", "b_file", "a+b"]))
    content = runs["a"] + runs["b_file"][runs["cut"] + 1:] if base == "a+b" else runs[base]
    done = [base]
    for _ in range(data.draw(st.integers(0, 3))):
        content, how = data.draw(file_edit(content, runs["a"]))
        done.append(how)
    folder = Path(tempfile.mkdtemp(dir=runs["root"])) / "logs"
    folder.mkdir()
    (folder / "metrics.jsonl").write_bytes(content)
    if data.draw(st.booleans()):
        check_resume_append(runs, folder, first_step=3)
        done.append("resumed")
    with pytest.MonkeyPatch.context() as monkeypatch:
        event(check_plot(plot_tool, monkeypatch, folder, " / ".join(done)))
    for how in done:
        event(how.split(":")[0] if not how.startswith("line") else how.split(":")[1])
    shutil.rmtree(folder.parent)


def test_lines_that_are_no_records_and_values_near_the_float_limit(plot_tool, tmp_path, monkeypatch):
    """Cases the property meets now and then, each once: a line nested past json's recursion (a RecursionError
    traceback), steps of true, "1" and 0.5 (read as steps 1, 1 and 0 they dropped the records before them), a "\\r"
    inside a record (JSON whitespace: it was read as a line end, the record lost), a loss of true (drawn as 1), an lr
    of 1e308 (drawn, but numpy's overflow warnings printed lines of matplotlib's source on stderr)."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 3.0}\n' + "[" * 5000 + '\n{"step": true}\n{"step": "1"}\n{"step": 0.5}\n'
                       '{"step": 2,\r "loss": 2.5, "lr": 1e308}\n{"step": 3, "loss": true, "lr": 0.001}\n')
    records, bad = plot_tool.read_metrics(metrics)
    assert [r["step"] for r in records] == [1, 2, 3] and bad == 4
    assert plot_tool.series(records, "loss") == ([1, 2], [3.0, 2.5])
    code, out, err, raised, drawn = call_plot(plot_tool, monkeypatch, [str(tmp_path)])
    assert code == 0 and not raised and err == f"warning: skipped 4 unreadable line(s) of {metrics}\n", (err, raised)
    assert drawn["learning rate"][0] == ([2, 3], [1e308, 0.001])


def test_a_metrics_path_that_is_no_readable_file(plot_tool, runs, tmp_path, monkeypatch):
    """A folder, a pipe, a file whose reads fail (/proc/self/mem: EIO at offset 0, a disk's I/O error as root sees
    it) or an empty file as metrics.jsonl: plot_run refuses in one line naming it (an I/O error said no file), and the
    trainer's start says no note of earlier records (a folder was said to hold them); a folder stops the trainer's
    start in one line (the run went on with a warning at step 1, writing no record)."""
    from nanotronix.errors import UserError
    from nanotronix.train.metrics import MetricsLog, earlier_records_note

    cfg = copy.deepcopy(runs["config"])
    for kind, make, said in (("folder", Path.mkdir, "not a file"), ("pipe", os.mkfifo, "not a file"),
                             ("unreadable", lambda p: p.symlink_to("/proc/self/mem"),
                              "cannot be read (Input/output error)"),
                             ("empty", lambda p: p.write_bytes(b""), "no metrics records")):
        folder = tmp_path / kind
        folder.mkdir()
        metrics = folder / "metrics.jsonl"
        make(metrics)
        code, out, err, raised, _ = call_plot(plot_tool, monkeypatch, [str(folder)])
        assert (code, err, out, raised) == (2, f"error: {metrics}: {said}\n", "", []), kind
        assert listing(folder) == ["metrics.jsonl"], kind
        cfg.logging.dir = str(folder)
        assert earlier_records_note(cfg, 0) is None, kind
    cfg.logging.dir = str(tmp_path / "folder")
    with pytest.raises(UserError) as caught:
        MetricsLog(cfg, enabled=True)
    assert str(caught.value) == (f"logging.dir: {tmp_path / 'folder' / 'metrics.jsonl'} is a folder: rank 0 appends "
                                 "the metrics records to a file of that name") and caught.value.said_for_the_stopped
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "metrics.jsonl")  # before: passed, and the whole run kept no record ("Illegal seek")
    cfg.logging.dir = str(tmp_path / "fifo")
    with pytest.raises(UserError, match=r"metrics.jsonl is a FIFO or socket: rank 0 appends the metrics records"):
        MetricsLog(cfg, enabled=True)


def test_a_file_where_the_tensorboard_folder_goes_is_one_line(runs, tmp_path):
    """LOGGING_DIR/tensorboard as a file (a hand edit, a copy gone wrong): one line before step 1, rank 0's for the
    ranks it stops (TensorBoard's writer raised FileExistsError, a traceback), and the file left as it was."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from nanotronix.errors import UserError
    from nanotronix.train.metrics import MetricsLog

    cfg = copy.deepcopy(runs["config"])
    cfg.logging.dir, cfg.logging.tensorboard = str(tmp_path), True
    (tmp_path / "tensorboard").write_text("notes\n")
    with pytest.raises(UserError) as caught:
        MetricsLog(cfg, enabled=True)
    assert str(caught.value) == f"logging.tensorboard: cannot write {tmp_path / 'tensorboard'} (File exists)"
    assert caught.value.said_for_the_stopped and (tmp_path / "tensorboard").read_text() == "notes\n"
