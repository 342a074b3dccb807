"""Property-based tests (hypothesis, configured in tests/properties.py) of a run's checkpoint folder in any state a
run, a crash, a user or a copy leaves it (README, Checkpoints; nanotronix/checkpoint/paths.py), and of every reader of
it: committed steps (copies of a real trained step, its manifest saying the step and the keep_every / keep_steps it
was saved with), step folders without a manifest, files and symlinks where step folders are expected (to a step
outside the run, to one of another step, to nothing), the hidden folders of saves (`.step_N.tmp`, `.replaced`,
`.pruning`, as folders or files), `.latest.tmp-PID`, the `latest` pointer (absent, naming a committed / missing /
older / non-step entry, garbage bytes, empty, a folder), stray files, an earlier rollback's folder, a `.lock` that is
stale or held by a live run.

Checked against references written below from the README's and the docstrings' words:
- committed_steps and the step a resume (checkpoint.resume: auto) picks: the newest step folder holding its manifest;
  `python -m nanotronix.preflight` and `tools/inspect_checkpoint.py RUN_DIR` on it (its committed steps and those kept
  for good, by the inspected step's settings or the settings each was saved with);
- prune: exactly the committed steps outside the newest keep_last that are not the one `latest` names nor a milestone
  by the current settings or those they were saved with, each gone whole, and nothing else touched;
- remove_stale_temps: exactly the hidden entries of saves that never committed and the pointer's temp file;
- `tools/rollback.py RUN_DIR --to-step N`: refused in one line with nothing moved where the step is not committed, is
  damaged or a run holds the lock; else the later committed steps (and only they) move into one new
  `rolled_back_after_step_N-TIME/`, `latest` names N, a resume picks N, and a second rollback is consistent.
Every command exits 0 or ends with ONE `error:` line (exit 2), no traceback (test_cli_properties.call_and_check).
~30 s on one core."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import load_tool
from properties import PROPERTY
from test_cli_properties import call_and_check

from nanotronix.checkpoint import paths
from nanotronix.checkpoint.checkpointer import choose_resume_source
from nanotronix.checkpoint.errors import CheckpointError

STEPS = range(1, 10)  # the step numbers a drawn run folder may hold
SOURCE_STEP = 4  # the trained step every committed step is a copy of (conftest.py's `trained`)
# What an entry named step_NNNNNNN is: a committed step (a real copy, its manifest edited to that step), a symlink to
# one outside the run (committed), a symlink to a step of another number (committed, refused by readers as damaged),
# a folder whose save never wrote its manifest, one whose checkpoint.json is a folder, a file, a dangling symlink
STEP_KINDS = ["committed"] * 5 + ["link"] * 2 + ["link_other_step", "no_manifest", "manifest_folder", "file",
                                                 "dangling"]
COMMITTED = {"committed", "link", "link_other_step"}
READABLE = {"committed", "link"}
# A save's hidden entries (folders as a kill leaves them, or files where folders are expected) and the pointer's temp
TEMP_KINDS = ["tmp", "tmp_with_manifest", "replaced", "pruning", "tmp_file", "latest_temp", "latest_temp_folder"]
STRAYS = ["notes.txt", "step_0000003.bak/", "rolled_back_after_step_0000002-20260101-000000/step_0000008/", ".lock",
          "step_x/", "latest.old", "step_0000005\n/", ".step_0000006.tmp\n"]  # a name with a line break is no step
# keep_every / keep_steps a step's manifest says it was saved with; None: a config without them (saved before they
# existed), "wrong types": edited by hand (they then keep nothing)
SAVED = st.one_of(st.none(), st.just("wrong types"),
                  st.tuples(st.sampled_from([0, 2, 3, 5]), st.sets(st.sampled_from(list(STEPS)), max_size=2)),
                  st.tuples(st.just(0), st.sets(st.sampled_from(list(STEPS)), min_size=1, max_size=3)))


def name(step: int) -> str:
    return paths.step_folder_name(step)


def temp_name(kind: str, step: int) -> str:
    """The name of a save's hidden entry of TEMP_KINDS."""
    if kind.startswith("latest_temp"):
        return f".latest.tmp-{1000 + step}"
    return f".{name(step)}.{'tmp' if kind.startswith('tmp') else kind}"


@st.composite
def run_folders(draw) -> dict:
    """A run folder's description (built by `build`)."""
    steps = draw(st.dictionaries(st.sampled_from(list(STEPS)), st.sampled_from(STEP_KINDS), max_size=7))
    latest = draw(st.one_of(
        st.none(), st.just(b"folder"),
        st.sampled_from([f"{name(s)}\n" for s in STEPS] + [f"{name(s)}\n" for s in steps] * 3).map(str.encode),
        st.sampled_from([b"step_0000099\n", b"notes.txt\n", b"", b" \n", b"\xff\xfe\x00", b"../outside/step_0000004\n",
                         f"  {name(4)}  ".encode()])))
    return {
        "steps": steps,
        "saved": {s: draw(SAVED) for s in sorted(steps)},
        "temps": draw(st.lists(st.tuples(st.sampled_from(TEMP_KINDS), st.sampled_from(list(STEPS))), max_size=3,
                               unique_by=lambda temp: temp_name(temp[0], temp[1]))),
        "latest": latest,
        "strays": draw(st.lists(st.sampled_from(STRAYS), max_size=3, unique=True)),
    }


# --- building a drawn folder ---------------------------------------------------------------------------------------

def committed_copy(source: Path, dest: Path, step: int, saved) -> None:
    """`source` (a real step) as step `step` at `dest`, hard-linked (cheap; nothing writes into a step's files), its
    manifest saying `step`, the samples of `step` steps and the retention settings `saved`."""
    shutil.copytree(source, dest, copy_function=os.link)
    manifest = json.loads((source / paths.MANIFEST_NAME).read_text())
    per_step = manifest["consumed_samples"] // manifest["step"]  # the global batch: the step's own samples, so that
    # the trainer's (and the preflight's) check of the global batch size against the step holds
    manifest["step"], manifest["optimizer_step"] = step, min(manifest["optimizer_step"], step)
    manifest["consumed_samples"] = per_step * step
    settings_saved = manifest["config"]["checkpoint"]
    settings_saved.pop("keep_every", None), settings_saved.pop("keep_steps", None)
    if saved == "wrong types":
        settings_saved.update(keep_every="3", keep_steps=[True])
    elif saved is not None:
        settings_saved.update(keep_every=saved[0], keep_steps=sorted(saved[1]))
    (dest / paths.MANIFEST_NAME).unlink()  # a hard link to the source's manifest: replaced, not written through
    (dest / paths.MANIFEST_NAME).write_text(json.dumps(manifest))


def build(spec: dict, source: Path, root: Path) -> Path:
    """The run folder `spec` describes, at root/ckpt (root/outside holds what its symlinks point to)."""
    run, outside = root / "ckpt", root / "outside"
    run.mkdir()
    outside.mkdir()
    for step, kind in spec["steps"].items():
        folder = run / name(step)
        if kind in ("committed", "no_manifest", "manifest_folder"):
            committed_copy(source, folder, step, spec["saved"][step])
            if kind != "committed":
                (folder / paths.MANIFEST_NAME).unlink()
            if kind == "manifest_folder":
                (folder / paths.MANIFEST_NAME).mkdir()
        elif kind in ("link", "link_other_step"):
            target = outside / f"{name(step)}-{kind}"
            committed_copy(source, target, step if kind == "link" else step + 10, spec["saved"][step])
            folder.symlink_to(target)
        elif kind == "file":
            folder.write_text("not a step\n")
        else:
            folder.symlink_to(outside / "nothing")
    for kind, step in spec["temps"]:
        entry = run / temp_name(kind, step)
        if kind == "latest_temp":
            entry.write_text(f"{name(step)}\n")
        elif kind == "tmp_file":
            entry.write_text("")
        elif kind == "latest_temp_folder":
            entry.mkdir()
        else:
            folder = entry
            folder.mkdir()
            (folder / "__0_0.distcp").write_bytes(b"partial")
            if kind == "tmp_with_manifest":  # killed between its manifest and its commit rename
                (folder / paths.MANIFEST_NAME).write_text("{}")
    if spec["latest"] == b"folder":
        (run / paths.LATEST_NAME).mkdir()
    elif spec["latest"] is not None:
        (run / paths.LATEST_NAME).write_bytes(spec["latest"])
    for stray in spec["strays"]:
        (run / stray).parent.mkdir(parents=True, exist_ok=True)
        if stray.endswith("/"):
            (run / stray).mkdir()
            (run / stray / paths.MANIFEST_NAME).write_text("{}")
        else:
            (run / stray).write_text("host h pid 1 since then\n" if stray == ".lock" else "x\n")
    return run


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` but the run's lock file (each holder writes its name in it, the tools too), symlinks
    not followed: relative path -> what it is (a folder, a file's SHA-256, a link's target)."""
    found = {}
    for parent, dirs, files in os.walk(folder):
        for entry in dirs + files:
            path = Path(parent, entry)
            rel = str(path.relative_to(folder))
            if rel == f"ckpt/{paths.LOCK_NAME}":
                continue
            if path.is_symlink():
                found[rel] = f"link {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "folder"
            else:
                found[rel] = f"file {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return found


# --- the references -------------------------------------------------------------------------------------------------

def committed(spec: dict) -> list[int]:
    """A run's committed steps: the step_NNNNNNN entries holding checkpoint.json (a file), oldest first."""
    return sorted(s for s, kind in spec["steps"].items() if kind in COMMITTED)


def latest_names(spec: dict):
    """The committed step that the `latest` pointer names (its text, stripped), if any."""
    text = spec["latest"]
    if text in (None, b"folder"):
        return None
    try:
        named = text.decode().strip()
    except UnicodeDecodeError:
        return None
    return next((s for s in committed(spec) if name(s) == named), None)


def milestone(keep_every: int, keep_steps, step: int) -> bool:
    """README: every multiple of checkpoint.keep_every and each step in checkpoint.keep_steps."""
    return (keep_every > 0 and step % keep_every == 0) or step in keep_steps


def saved_milestone(spec: dict, step: int) -> bool:
    """A milestone by the settings the step was saved with (none when it holds none, or none of their types)."""
    saved = spec["saved"][step]
    return saved not in (None, "wrong types") and milestone(saved[0], saved[1], step)


def pruned(spec: dict, keep_last: int, keep_every: int, keep_steps) -> list[int]:
    """README / prune's docstring: keep_last 0 keeps all; else every committed step but the newest keep_last, the one
    `latest` names, and the milestones by the current settings or by those it was saved with."""
    if keep_last == 0:
        return []
    return [s for s in committed(spec)[:-keep_last] if s != latest_names(spec)
            and not milestone(keep_every, keep_steps, s) and not saved_milestone(spec, s)]


# --- the tests --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(trained, commands_in_process):
    """The trained run's config file and the step every committed step of a drawn folder is a copy of."""
    cfg, folder = trained
    return cfg, folder / "ckpt" / name(SOURCE_STEP)


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory):
    return tmp_path_factory.mktemp("run_folders")


def drawn_folder(data, source, scratch_root) -> tuple[dict, Path]:
    spec = data.draw(run_folders(), "run folder")
    return spec, build(spec, source[1], Path(tempfile.mkdtemp(dir=scratch_root)))


@settings(PROPERTY, max_examples=100)
@given(data=st.data())
def test_committed_steps_resume_and_inspect(source, scratch_root, data):
    """committed_steps, the step checkpoint.resume auto / none decides on, preflight and inspect_checkpoint of the run
    folder; none of them changes anything in it."""
    spec, run = drawn_folder(data, source, scratch_root)
    before, steps = snapshot(run.parent), committed(spec)
    assert [paths.step_of(p) for p in paths.committed_steps(run)] == steps
    newest = run / name(steps[-1]) if steps else None
    assert choose_resume_source(run, "auto", log=print) == newest
    if steps:
        with pytest.raises(CheckpointError, match="already holds checkpoints"):
            choose_resume_source(run, "none", log=print)
    else:
        assert choose_resume_source(run, "none", log=print) is None
    readable = bool(steps) and spec["steps"][steps[-1]] in READABLE

    from nanotronix.preflight import main as preflight
    code, out, _ = call_and_check(preflight, [("text", a) for a in (
        "--config", str(source[0]), f"checkpoint.dir={run}", "checkpoint.resume=auto", "train.train_steps=20",
        f"logging.dir={run.parent / 'logs'}")], {}, scratch_root)
    assert code == (0 if readable or not steps else 2), (spec, out)

    inspect = load_tool("inspect_checkpoint").main
    code, out, _ = call_and_check(inspect, [("text", str(run)), ("text", "--json")], {}, scratch_root)
    assert code == (0 if readable else 2), (spec, out)
    if readable:
        report, latest_saved = json.loads(out), spec["saved"][steps[-1]]
        every, kept = latest_saved if latest_saved not in (None, "wrong types") else (0, ())
        assert (report["step"], report["run_steps"]) == (steps[-1], steps)
        assert report["milestones"] == [s for s in steps if milestone(every, kept, s) or saved_milestone(spec, s)]
    code, _, _ = call_and_check(inspect, [("text", str(run))], {}, scratch_root)
    assert code == (0 if readable else 2)
    assert snapshot(run.parent) == before
    shutil.rmtree(run.parent)


@settings(PROPERTY, max_examples=150)
@given(data=st.data(), keep_last=st.integers(0, 4), keep_every=st.sampled_from([0, 2, 3]),
       keep_steps=st.sets(st.sampled_from(list(STEPS)), max_size=2))
def test_prune_removes_exactly_the_steps_retention_lets_go(source, scratch_root, data, keep_last, keep_every,
                                                           keep_steps):
    spec, run = drawn_folder(data, source, scratch_root)
    before = snapshot(run.parent)
    doomed = pruned(spec, keep_last, keep_every, keep_steps)
    removed = paths.prune(run, paths.Retention(keep_last, keep_every, frozenset(keep_steps)))
    assert [paths.step_of(p) for p in removed] == doomed, spec
    # each pruned step whole (a symlinked one: the link, not what it links to), and what an earlier prune of it that
    # was cut short left under the name pruning renames it to
    gone = {rel for rel in before if any(top in (f"ckpt/{name(s)}", f"ckpt/.{name(s)}.pruning") for s in doomed
                                         for top in ["/".join(rel.split("/")[:2])])}
    assert snapshot(run.parent) == {rel: what for rel, what in before.items() if rel not in gone}, spec
    shutil.rmtree(run.parent)


@settings(PROPERTY, max_examples=100)
@given(data=st.data())
def test_remove_stale_temps_removes_exactly_the_leftovers_of_saves(source, scratch_root, data):
    """A save starts by removing what killed saves and prunes left (README: `.step_N.tmp/`, `.latest.tmp-PID`), whatever
    they are (a file where a folder is expected would stop the save of that step), and nothing else."""
    spec, run = drawn_folder(data, source, scratch_root)
    before = snapshot(run.parent)
    paths.remove_stale_temps(run)
    stale = re.compile(r"^ckpt/(\.step_[0-9]+\.(tmp|replaced|pruning)|\.latest\.tmp-[0-9]+)(/|\Z)")
    assert snapshot(run.parent) == {rel: what for rel, what in before.items() if not stale.match(rel)}, spec
    shutil.rmtree(run.parent)


@settings(PROPERTY, max_examples=120)
@given(data=st.data(), to_step=st.sampled_from([0, *STEPS, 10]), held=st.booleans())
def test_rollback_moves_exactly_the_later_committed_steps(source, scratch_root, data, to_step, held):
    spec, run = drawn_folder(data, source, scratch_root)
    rollback = load_tool("rollback").main
    steps, before = committed(spec), snapshot(run.parent)
    lock = None
    if held:  # a live run's rank 0 holds the lock (an flock of another open file description conflicts, in-process)
        lock = os.open(run / paths.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        code, out, err = call_and_check(rollback, [("text", str(run)), ("text", "--to-step"), ("text", str(to_step))],
                                        {}, scratch_root, writes=True)
    finally:
        if lock is not None:
            os.close(lock)
    refused = held or to_step not in steps or spec["steps"][to_step] not in READABLE or spec["latest"] == b"folder"
    after = snapshot(run.parent)
    if refused:
        assert code == 2, (spec, out)
        assert after == before, (spec, err)
        shutil.rmtree(run.parent)
        return
    assert code == 0, (spec, err)
    later = [s for s in steps if s > to_step]
    asides = [p for p in run.iterdir() if re.match(rf"^rolled_back_after_{name(to_step)}-\d{{8}}-\d{{6}}$", p.name)
              and f"ckpt/{p.name}" not in before]
    assert len(asides) == (1 if later else 0), (spec, asides)
    moved = {f"ckpt/{name(s)}": f"ckpt/{asides[0].name}/{name(s)}" for s in later}

    def moved_to(rel: str) -> str:
        top = "/".join(rel.split("/")[:2])
        return moved[top] + rel[len(top):] if top in moved else rel

    expected = {moved_to(rel): what for rel, what in before.items() if rel != "ckpt/latest"}
    if later:
        expected[f"ckpt/{asides[0].name}"] = "folder"
    expected["ckpt/latest"] = f"file {hashlib.sha256(f'{name(to_step)}{chr(10)}'.encode()).hexdigest()}"
    assert after == expected, spec
    assert [paths.step_of(p) for p in paths.committed_steps(run)] == [s for s in steps if s <= to_step]
    assert choose_resume_source(run, "auto", log=print) == run / name(to_step)
    # again to the same step: nothing moves; to a step set aside: refused, nothing moves
    before = snapshot(run.parent)
    code, _, _ = call_and_check(rollback, [("text", str(run)), ("text", "--to-step"), ("text", str(to_step))], {},
                                scratch_root, writes=True)
    assert code == 0 and snapshot(run.parent) == before
    if later:
        code, _, _ = call_and_check(rollback, [("text", str(run)), ("text", "--to-step"), ("text", str(later[0]))],
                                    {}, scratch_root, writes=True)
        assert code == 2 and snapshot(run.parent) == before
    shutil.rmtree(run.parent)
