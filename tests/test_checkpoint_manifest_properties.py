"""Property-based tests (hypothesis, configured in tests/properties.py) of what every reader of a checkpoint does with a
damaged or hand-edited `checkpoint.json` (README, Checkpoints; DESIGN.md): each command, called in this process on a
copy of a real trained run whose step's manifest was edited, returns 0 or ends with ONE `error: ...` line (exit 2), no
traceback, nothing new besides its documented outputs, and the run it was copied from unchanged.

The edits, drawn from the real manifest: a key deleted at any depth, a value replaced by one of another JSON type
(null, bool, int, a 400-digit int, a negative, a float, NaN / Infinity as Python's json writes them, a string, a list,
an object), numbers changed (step, consumed samples, per-dataset consumption, file sizes and hashes, layout, format
version, model dimensions: alone or together, keeping the manifest consistent), keys renamed, entries added to the
file list; then the text truncated, non-UTF-8 bytes put in, nested too deep for the JSON reader, or not an object at
all. The readers: tools/inspect_checkpoint.py (with and without --verify / --json, given the step or its run
folder), tools/convert_to_hf.py, tools/rollback.py (to the edited step), `python -m nanotronix.evaluate`, the
trainer's resume (`python -m nanotronix.train`, world size 1, checkpoint.resume naming the edited step, one step
trained after it and saved) and `python -m nanotronix.preflight` (which checks that resume before a launch).

Beside "one line or works", what each reader must refuse (`refusal_due`, from the edited bytes and the true
manifest): what is not a manifest of this version, or has no step or file list (all); a listed file absent or of
another size (all that check sizes); a data file unlisted or of another SHA-256 (those that read weights, and
--verify for every file); another RoPE layout or weight shapes (those that read weights; a regrouping of the heads
that keeps every shape is the one edit that passes: the manifest records no other shapes); another architecture
than the run's (resume, preflight). `--hypothesis-show-statistics` shows the outcomes. ~25 s on one core."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from helpers import load_tool
from properties import PROPERTY, damaged_json
from test_cli_properties import call_and_check

MANIFEST = "checkpoint.json"
STEPS = (2, 3, 4)  # the `trained` run's committed steps (conftest.py)

# --- the edits ----------------------------------------------------------------------------------------------------

# A value of every JSON type, as a hand edit or a damaged writer leaves one (json.dumps writes nan as NaN)
OTHER_VALUES = [None, True, False, 0, 1, -1, 2, 10 ** 400, -(10 ** 18), 2 ** 63, 0.5, 4.0, -0.0, 1e308, math.nan,
                math.inf, -math.inf, "", "4", "x", "\u00fc", [], [1], [None], {}, {"size": 1}]
# Fields every reader relies on, beside the rest of the manifest: edited more often than the long config
FOCUS = ("step", "consumed_samples", "optimizer_step", "optimizer", "format", "format_version", "data", "layout",
         "files", "trainer_state", "source", "rope_layout")
# The config sections a reader takes values from (the rest: only compared with the run's, for notes)
READ_CONFIG = (("config", "model"), ("config", "data"), ("config", "train"), ("config", "checkpoint"))
RENAMES = st.sampled_from(["", "Step", "step ", "files_", "size", "sha256", "model", "config", "x"])


def places(value: Any, prefix: tuple = ()) -> list[tuple]:
    """The key path of every dict entry and list item in a JSON value, at any depth."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found = []
    for key, item in items:
        found.append((*prefix, key))
        found += places(item, (*prefix, key))
    return found


def at(value: Any, path: tuple) -> Any:
    for key in path:
        value = value[key]
    return value


def numbers_near(old: Any) -> st.SearchStrategy:
    """Another number for a numeric field: its neighbours, its sign turned, scaled, fractional, huge."""
    base = old if type(old) is int else int(old) if isinstance(old, float) and math.isfinite(old) else 1
    fractional = [base + 0.5, float(base)] if abs(base) < 2 ** 53 else [0.5]
    return st.one_of(st.sampled_from([0, -1, 1, base + 1, base - 1, 2 * base, base // 2, -base, *fractional,
                                      2 ** 31, 2 ** 63, 10 ** 30, 10 ** 400]),
                     st.integers(-(10 ** 6), 10 ** 6))


@st.composite
def structural_edit(draw, manifest: dict) -> tuple[str, Any]:
    """One edit of the parsed manifest (in place); returns what it did, for the failure's report."""
    everywhere = places(manifest)
    focused = [p for p in everywhere if p[0] in FOCUS or p[:2] in READ_CONFIG]
    path = draw(st.sampled_from(focused) if draw(st.booleans()) else st.sampled_from(everywhere))
    parent, key = at(manifest, path[:-1]), path[-1]
    kind = draw(st.sampled_from(["delete", "replace", "number", "rename", "consistent", "files"]))
    shaped = all(isinstance(manifest.get(k), dict) for k in ("data", "config", "files")) and \
        isinstance(manifest["config"].get("model"), dict) and isinstance(manifest["config"].get("train"), dict) \
        and manifest["files"] and all(isinstance(f, dict) for f in manifest["files"].values())
    if kind in ("consistent", "files") and not shaped:  # an earlier edit took away what these change
        kind = "delete"
    if kind == "delete":
        del parent[key]
    elif kind == "replace":
        parent[key] = copy.deepcopy(draw(st.sampled_from(OTHER_VALUES)))
    elif kind == "number":
        numeric = [p for p in everywhere if isinstance(at(manifest, p), (int, float))
                   and not isinstance(at(manifest, p), bool)] or [path]
        path = draw(st.sampled_from(numeric))
        at(manifest, path[:-1])[path[-1]] = draw(numbers_near(at(manifest, path)))
    elif kind == "rename":
        dicts = [p for p in everywhere if isinstance(at(manifest, p[:-1]), dict)]
        path = draw(st.sampled_from(dicts))
        parent = at(manifest, path[:-1])
        parent[f"{path[-1]}{draw(RENAMES)}"] = parent.pop(path[-1])
    elif kind == "consistent":  # numbers changed together, as a careful hand edit would
        which = draw(st.sampled_from(["step", "layout", "model"]))
        if which == "step":
            step = draw(st.sampled_from([0, 1, 3, 5, 100, 10 ** 9]))
            gbs = manifest["config"]["train"].get("global_batch_size")
            gbs = gbs if type(gbs) is int else 8
            manifest.update(step=step, consumed_samples=step * gbs, optimizer_step=step)
            manifest["data"]["consumed_samples"] = step * gbs
        elif which == "layout":
            tp, pp, dp = (draw(st.sampled_from([1, 2, 4])) for _ in range(3))
            manifest["layout"] = {"tp": tp, "pp": pp, "dp": dp, "world_size": tp * pp * dp}
        else:
            heads = draw(st.sampled_from([1, 2, 4, 8]))
            model = manifest["config"]["model"]
            model.update(num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from([1, heads])),
                         hidden_size=draw(st.sampled_from([32, 64, 128])),
                         num_hidden_layers=draw(st.sampled_from([1, 3, 4, 5])))
        path = (which,)
    else:  # the file list: a size or hash changed, an entry gone, another's, or one for a file that is not there
        files = manifest["files"]
        name = draw(st.sampled_from(sorted(files)))
        how = draw(st.sampled_from(["size", "hash", "drop", "swap", "add"]))
        if how == "size":
            files[name]["size"] = draw(numbers_near(files[name].get("size")))
        elif how == "hash":
            files[name]["sha256"] = draw(st.sampled_from(["0" * 64, str(files[name].get("sha256")).upper(), "", "x"]))
        elif how == "drop":
            del files[name]
        elif how == "swap":
            other = draw(st.sampled_from(sorted(files)))
            files[name], files[other] = files[other], files[name]
        else:
            files[draw(st.sampled_from(["extra.distcp", "../step_0000003/__0_0.distcp", "/etc/hostname", "",
                                        ".", "rng", "rng/rank_00001.pt"]))] = {"size": 1, "sha256": "0" * 64}
        path = ("files", name, how)
    return kind, path


class EditedManifest:
    """The new checkpoint.json (`data`), shown as the edits that made it (`what`) in a failure's report."""

    def __init__(self, data: bytes, what: list):
        self.data, self.what = data, what

    def __repr__(self) -> str:
        return f"EditedManifest({self.what!r}, {len(self.data)} bytes)"


@st.composite
def edited_manifest(draw, text: str) -> EditedManifest:
    """The manifest's new bytes after one to three edits of its content, then perhaps damage to its text."""
    manifest = json.loads(text)
    done = [draw(structural_edit(manifest)) for _ in range(draw(st.integers(1, 3)))] \
        if draw(st.integers(0, 9)) else []
    data, damage = draw(damaged_json(manifest))
    return EditedManifest(data, [*done, damage])


# --- the run and its edited copies --------------------------------------------------------------------------------

def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path) and its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(trained, commands_in_process):
    """The trained run (its config file, its folder) and the fingerprint of its checkpoint folder, which no call may
    change."""
    cfg, folder = trained
    return cfg, folder, fingerprint(folder / "ckpt")


@pytest.fixture(scope="module")
def edits_root(tmp_path_factory):
    return tmp_path_factory.mktemp("edited")


def with_edited_step(run, root: Path, step: int, data: bytes) -> dict[str, str]:
    """A copy of the run's checkpoint folder whose step `step` holds `data` as its manifest: the names of what the
    commands read (call_and_check's `world`): the step, the run folder, the token store."""
    _, folder, _ = run
    copy_root = Path(tempfile.mkdtemp(dir=root))
    shutil.copytree(folder / "ckpt", copy_root / "ckpt")
    step_folder = copy_root / "ckpt" / f"step_{step:07d}"
    (step_folder / MANIFEST).write_bytes(data)
    return {"step": str(step_folder), "ckpt": str(copy_root / "ckpt"), "store": str(folder / "arith")}


def check_and_clean(run, world: dict[str, str], data: bytes, codes: list) -> None:
    """What every call leaves: an exit code of 0 or 2, the edited manifest as it was, the run it came from unchanged."""
    _, folder, before = run
    assert codes and codes[-1] in (None, 0, 2), codes
    assert Path(world["step"], MANIFEST).read_bytes() == data
    assert fingerprint(folder / "ckpt") == before
    shutil.rmtree(Path(world["ckpt"]).parent)


def recording(main, codes: list):
    """`main`, noting the exit code it returns or exits with."""
    def call(argv):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        codes.append(code)
        return code
    return call


def source_manifest(run, step: int) -> str:
    return (run[1] / "ckpt" / f"step_{step:07d}" / MANIFEST).read_text()


# --- what must be refused -----------------------------------------------------------------------------------------

DATA_FILES = (".metadata", "__0_0.distcp")  # what the weights are read from (the RNG file: only on a resume)
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings")
ARCHITECTURE_FIELDS = (*SHAPE_FIELDS, "num_attention_heads", "num_key_value_heads")


def refusal_due(data: bytes, original: str, checks: set[str]) -> str | None:
    """Why a command must refuse the edited manifest `data` (None: it may work, or refuse it for a reason of its own),
    by the `checks` it makes: "sizes" (every listed file present and of its size), "hashes" (the weights' files
    listed with their true SHA-256), "verify" (every listed file's SHA-256, no file left out), "weights" (read as the
    model the manifest describes: its RoPE layout, the weights' shapes), "architecture" (against the run's config).
    A manifest of another version, without a step or a file list, or of another step than its folder's name is refused
    by all."""
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError):
        return "not JSON"
    if not isinstance(manifest, dict) or manifest.get("format") != "nanotronix-checkpoint" \
            or manifest.get("format_version") != 1 or type(manifest.get("format_version")) is not int:
        return "not a manifest of this version"
    step, files, truth = manifest.get("step"), manifest.get("files"), json.loads(original)
    if type(step) is not int or not 0 <= step < 2 ** 63 or not isinstance(files, dict):
        return "no step or no file list"
    if step != truth["step"]:  # the edited manifest stays in its folder, step_<the true step>
        return "a step other than its folder's"
    real = truth["files"]
    if "sizes" in checks and any(not isinstance(info, dict) or name not in real or type(info.get("size")) is not int
                                 or info["size"] != real[name]["size"] for name, info in files.items()):
        return "a listed file is missing or of another size"
    if "verify" in checks and (files != {name: real[name] for name in files if name in real}
                               or not set(DATA_FILES) <= files.keys()):
        return "a listed file's SHA-256 is not its own, or a data file is not listed"
    if "hashes" in checks and any(files.get(name) != real[name] for name in DATA_FILES):
        return "a data file unlisted or listed with another SHA-256"
    model, saved = (manifest.get("config") or {}), truth["config"]["model"]
    model = model.get("model") if isinstance(model, dict) else None
    if not isinstance(model, dict):
        return "no model config" if checks & {"weights", "architecture"} else None
    if "weights" in checks and manifest.get("rope_layout", "rotate_half") != "rotate_half":
        return "another RoPE layout"
    if "weights" in checks and any(model.get(k) != saved[k] or type(model.get(k)) is not type(saved[k])
                                   and isinstance(saved[k], bool) for k in SHAPE_FIELDS):
        return "a model config of other weight shapes"
    heads, kv = model.get("num_attention_heads"), model.get("num_key_value_heads")
    if "weights" in checks and type(heads) is int and type(kv) is int and heads > 0 and kv > 0 \
            and Fraction(kv, heads) != Fraction(saved["num_key_value_heads"], saved["num_attention_heads"]):
        return "a model config of another q/k/v shape"  # (heads regrouped at the same ratio export as another model)
    if "architecture" in checks and any(model.get(k) != saved[k] for k in ARCHITECTURE_FIELDS):
        return "another architecture than the run's"
    return None


def check_refusal(edit: EditedManifest, original: str, checks: set[str], codes: list) -> None:
    why = refusal_due(edit.data, original, checks)
    event(f"exit {codes[-1] or 0}, {'must be refused: ' + why if why else 'may work'}")  # --hypothesis-show-statistics
    assert why is None or codes[-1] == 2, (edit, f"must be refused: {why}", codes)


# --- the readers --------------------------------------------------------------------------------------------------

@settings(PROPERTY, max_examples=150)
@given(data=st.data(), target=st.sampled_from(["step", "ckpt"]), flags=st.sets(st.sampled_from(["--verify", "--json"])))
def test_inspect_checkpoint(run, edits_root, data, target, flags):
    edit = data.draw(edited_manifest(source_manifest(run, 4)), "edit")
    world, codes = with_edited_step(run, edits_root, 4, edit.data), []
    call_and_check(recording(load_tool("inspect_checkpoint").main, codes),
                   [("path", target), *[("text", f) for f in sorted(flags)], ("text", "--no-progress")], world,
                   edits_root)
    check_refusal(edit, source_manifest(run, 4), {"sizes", *(["verify"] if "--verify" in flags else [])}, codes)
    check_and_clean(run, world, edit.data, codes)


@settings(PROPERTY, max_examples=100)
@given(data=st.data())
def test_convert_to_hf(run, edits_root, data):
    edit = data.draw(edited_manifest(source_manifest(run, 4)), "edit")
    world, codes = with_edited_step(run, edits_root, 4, edit.data), []
    call_and_check(recording(load_tool("convert_to_hf").main, codes),
                   [("text", "--checkpoint"), ("path", "step"), ("text", "--output"), ("path", "hf"),
                    ("text", "--no-progress")], world, edits_root, writes=True)
    check_refusal(edit, source_manifest(run, 4), {"sizes", "hashes", "weights"}, codes)
    check_and_clean(run, world, edit.data, codes)


@settings(PROPERTY, max_examples=100)
@given(data=st.data())
def test_evaluate(run, edits_root, data):
    from nanotronix.evaluate import main

    edit = data.draw(edited_manifest(source_manifest(run, 4)), "edit")
    world, codes = with_edited_step(run, edits_root, 4, edit.data), []
    call_and_check(recording(main, codes),
                   [("text", "--checkpoint"), ("path", "step"), ("text", "--data"), ("path", "store"),
                    ("text", "--seq-len"), ("text", "8"), ("text", "--num-samples"), ("text", "2"),
                    ("text", "--no-progress")], world, edits_root)
    check_refusal(edit, source_manifest(run, 4), {"sizes", "hashes", "weights"}, codes)
    check_and_clean(run, world, edit.data, codes)


@settings(PROPERTY, max_examples=120)
@given(data=st.data(), step=st.sampled_from(STEPS))
def test_rollback(run, edits_root, data, step):
    """Back to the edited step, in a copy of the edited run folder (a rollback moves the later steps)."""
    edit = data.draw(edited_manifest(source_manifest(run, step)), "edit")
    world, codes = with_edited_step(run, edits_root, step, edit.data), []
    call_and_check(recording(load_tool("rollback").main, codes),
                   [("path", "ckpt"), ("text", "--to-step"), ("text", str(step))], world, edits_root, writes=True,
                   copies={"ckpt": "run_ckpt"})
    check_refusal(edit, source_manifest(run, step), {"sizes"}, codes)
    check_and_clean(run, world, edit.data, codes)


@settings(PROPERTY, max_examples=100)
@given(data=st.data())
def test_resume(run, edits_root, data):
    """The trainer (world size 1) resumes from the edited step 4 into a new checkpoint.dir and trains to step 5,
    saving it there, or fails in one line (the run and log folders it makes at start-up are its documented
    outputs; a save it began is committed whole or not at all)."""
    from nanotronix.train.main import main

    edit = data.draw(edited_manifest(source_manifest(run, 4)), "edit")
    world, codes = with_edited_step(run, edits_root, 4, edit.data), []
    out = Path(world["ckpt"]).parent / "resumed"
    call_and_check(recording(main, codes),
                   [("text", "--config"), ("text", str(run[0])), ("text", f"checkpoint.resume={world['step']}"),
                    ("text", f"checkpoint.dir={out / 'ckpt'}"), ("text", f"logging.dir={out / 'logs'}"),
                    ("text", "train.train_steps=5")], world, edits_root)
    saved = sorted(p.name for p in (out / "ckpt").iterdir()) if (out / "ckpt").is_dir() else []
    steps = [name for name in saved if name.startswith("step_")]
    assert not any(name.startswith(".step_") for name in saved), (edit, saved)  # no save left half-written
    if codes[-1] in (None, 0):  # step 5 trained and saved, unless the edited step is already the run's last
        assert steps[-1:] == ["step_0000005"] or not steps, (edit, saved)
    check_refusal(edit, source_manifest(run, 4), {"sizes", "hashes", "weights", "architecture"}, codes)
    check_and_clean(run, world, edit.data, codes)


@settings(PROPERTY, max_examples=120)
@given(data=st.data())
def test_preflight(run, edits_root, data):
    """`python -m nanotronix.preflight` with checkpoint.resume naming the edited step: it reads the manifest, compares
    the model with the config's and stats the listed files (hashes and weights are the trainer's), and makes none
    of the folders it checks."""
    from nanotronix.preflight import main

    edit = data.draw(edited_manifest(source_manifest(run, 4)), "edit")
    world, codes = with_edited_step(run, edits_root, 4, edit.data), []
    out = Path(world["ckpt"]).parent / "resumed"
    call_and_check(recording(main, codes),
                   [("text", "--config"), ("text", str(run[0])), ("text", f"checkpoint.resume={world['step']}"),
                    ("text", f"checkpoint.dir={out / 'ckpt'}"), ("text", f"logging.dir={out / 'logs'}"),
                    ("text", "train.train_steps=5")], world, edits_root)
    assert not out.exists()
    check_refusal(edit, source_manifest(run, 4), {"architecture", "sizes"}, codes)
    check_and_clean(run, world, edit.data, codes)
