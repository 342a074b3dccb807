"""Checkpoint storage: exact round trip, `latest` and retention, damaged files reported as one line naming the file,
the notes a resume gives on changed data, and the writers of replicated chunks. Crashes injected mid-save and the
fsync order are in test_checkpoint_crash_safety.py."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_helpers import TINY, adamw, load_single, plain_model, save_single, train_steps
from helpers import ROOT

from nanotronix.checkpoint import CheckpointError, find_checkpoint, resolve_checkpoint


@pytest.fixture
def trained(tmp_path):
    model = plain_model()
    opt = adamw(model)
    train_steps(model, opt, range(1, 4))
    folder = save_single(tmp_path / "run", 3, model, opt)
    return tmp_path / "run", folder, model, opt


def test_round_trip_continues_bit_for_bit(trained):
    run_dir, folder, model, opt = trained
    rng_after_save = torch.rand(3)  # what the generator gives right after the save (no reseed) ...
    uninterrupted = train_steps(model, opt, range(4, 8))

    model2 = plain_model(seed=99)  # a different init: everything must come from the checkpoint
    opt2 = adamw(model2)
    torch.manual_seed(5)
    manifest = load_single(folder, model2, opt2)
    assert manifest["_restored"] == {"optimizer": True, "rng": True}
    assert manifest["step"] == 3 and manifest["consumed_samples"] == 6 and manifest["optimizer_step"] == 3
    assert torch.equal(torch.rand(3), rng_after_save)  # ... and right after the load (it was reseeded to 123 and
    # compared with itself: true whatever the load did)
    assert train_steps(model2, opt2, range(4, 8)) == uninterrupted
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n


def test_rng_restored_is_the_saved_state(tmp_path):
    model = plain_model()
    opt = adamw(model)
    train_steps(model, opt, range(1, 2))
    torch.manual_seed(42)
    torch.rand(5)
    folder = save_single(tmp_path / "run", 1, model, opt)
    expected = torch.rand(4)
    torch.manual_seed(0)
    fresh = plain_model()
    load_single(folder, fresh, adamw(fresh))
    assert torch.equal(torch.rand(4), expected)


def test_latest_pointer_and_keep_last(tmp_path, monkeypatch):
    model = plain_model()
    opt = adamw(model)
    run_dir = tmp_path / "run"
    for step in range(1, 5):
        train_steps(model, opt, range(step, step + 1))
        save_single(run_dir, step, model, opt, keep_last=2)
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step_0000003", "step_0000004"]
    assert (run_dir / "latest").read_text().strip() == "step_0000004"
    assert find_checkpoint(run_dir) == run_dir / "step_0000004"
    assert find_checkpoint(run_dir / "step_0000003") == run_dir / "step_0000003"
    (run_dir / "latest").unlink()  # a crash between the rename and the pointer update
    assert find_checkpoint(run_dir) == run_dir / "step_0000004"
    assert find_checkpoint(tmp_path / "empty") is None
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "missing")
    # a path from the home folder, as `--checkpoint=~/run` gives it (the shell expands only a word's start)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_checkpoint("~/run") == resolve_checkpoint("~/run") == run_dir / "step_0000004"
    # the trainer's resume decision names the key the path came from (as the launch preflight's line does)
    from nanotronix.checkpoint.checkpointer import choose_resume_source
    with pytest.raises(CheckpointError, match=f"^checkpoint.resume: checkpoint not found: {tmp_path / 'missing'}$"):
        choose_resume_source(None, str(tmp_path / "missing"), log=lambda _: None)


def test_a_run_folder_that_cannot_be_listed_is_one_checkpoint_error(tmp_path, monkeypatch):
    """An OSError listing checkpoint.dir or checkpoint.resume's folder (EIO, ESTALE on NFS) while the step to resume
    from is chosen: the trainer's rank 0 re-raised it into a traceback (the other ranks keeping quiet), preflight too;
    it is the one `cannot read PATH: [Errno N] ...` CheckpointError of checkpoint.errors.unreadable, which rank 0 says
    for every rank."""
    import errno
    import os

    from nanotronix.checkpoint.checkpointer import choose_resume_source
    run_dir, other = tmp_path / "run", tmp_path / "other"
    run_dir.mkdir()
    other.mkdir()
    listed = Path.iterdir
    failing = {run_dir}

    def iterdir(self):
        if self in failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    said = f"cannot read {run_dir}: \\[Errno {errno.EIO}\\] {os.strerror(errno.EIO)}$"
    for mode in ("auto", "none", str(other)):
        with pytest.raises(CheckpointError, match=f"^{said}"):
            choose_resume_source(run_dir, mode, log=lambda _: None)
    failing = {other}
    with pytest.raises(CheckpointError, match=f"^checkpoint.resume: {said.replace(str(run_dir), str(other))}"):
        choose_resume_source(None, str(other), log=lambda _: None)


def test_milestones_are_never_pruned(tmp_path):
    """keep_last 2 with checkpoint.keep_every 3 and keep_steps [5]: after steps 1-10 the milestones 3, 5, 6, 9 stay
    with the newest two (9, 10)."""
    model = plain_model()
    opt = adamw(model)
    for step in range(1, 11):
        save_single(tmp_path / "run", step, model, opt, keep_last=2, keep_every=3, keep_steps=(5,))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "latest", "step_0000003", "step_0000005", "step_0000006", "step_0000009", "step_0000010"]


def test_a_latest_pointer_that_cannot_be_replaced_fails_the_save_saying_the_step_is_saved(tmp_path):
    """README: the rename is the commit, `latest` is moved after it. A `latest` that is a folder cannot be replaced:
    the save fails in one line that says the step is saved (a resume takes it) and the pointer is not, not "cannot
    commit checkpoint RUN/.step_N.tmp" (a folder gone by then); the older copy of a step saved again goes at once
    (it stayed, a whole checkpoint, until the next save). Once the folder is moved away, the next save moves
    `latest` again."""
    model = plain_model()
    opt = adamw(model)
    run_dir = tmp_path / "run"
    save_single(run_dir, 1, model, opt)
    (run_dir / "latest").unlink()
    (run_dir / "latest").mkdir()
    (run_dir / "latest" / "notes.txt").write_text("someone's\n")
    for _ in range(2):  # the second time step 2 is saved again, replacing the first copy
        with pytest.raises(CheckpointError) as err:
            save_single(run_dir, 2, model, opt)
        said = str(err.value)
        assert said.startswith(f"step 2 is saved in {run_dir / 'step_0000002'} (committed: a resume takes it), "
                               f"but {run_dir / 'latest'} could not be replaced to name it"), said
        assert "Is a directory" in said and "\n" not in said and ".tmp" not in said.split("(")[0], said
        assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step_0000001", "step_0000002"]
        assert find_checkpoint(run_dir) == run_dir / "step_0000002"
        assert (run_dir / "latest" / "notes.txt").read_text() == "someone's\n"
    fresh = plain_model(seed=5)
    assert load_single(find_checkpoint(run_dir), fresh, adamw(fresh))["step"] == 2
    (run_dir / "latest").rename(tmp_path / "moved")
    save_single(run_dir, 3, model, opt)
    assert (run_dir / "latest").read_text() == "step_0000003\n"



def test_a_prune_that_fails_after_the_commit_says_the_step_is_saved(tmp_path, monkeypatch):
    """Pruning runs after the commit: its failure (EIO listing the run folder) said "cannot commit checkpoint
    RUN/.step_N.tmp" of a step renamed into place, which a resume takes; it says the step is saved."""
    import errno
    import os

    from nanotronix.checkpoint import paths

    model = plain_model()
    opt = adamw(model)
    run_dir = tmp_path / "run"
    save_single(run_dir, 1, model, opt)

    def failing_prune(*_):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(run_dir))

    monkeypatch.setattr(paths, "prune", failing_prune)
    with pytest.raises(CheckpointError) as err:
        save_single(run_dir, 2, model, opt, keep_last=1)
    assert str(err.value) == (f"step 2 is saved in {run_dir / 'step_0000002'} (committed: a resume takes it), but "
                              f"pruning the older steps failed ([Errno {errno.EIO}] {os.strerror(errno.EIO)}: "
                              f"'{run_dir}')")
    assert find_checkpoint(run_dir) == run_dir / "step_0000002"
    assert (run_dir / "latest").read_text() == "step_0000002\n"


@pytest.mark.parametrize("pointer", ["../elsewhere/step_0000004", "{elsewhere}/step_0000004",
                                     "step_0000001/../../elsewhere/step_0000004"])
def test_a_latest_pointer_naming_anything_but_a_step_folder_of_the_run_is_stale(tmp_path, pointer):
    """`latest` is one of the run's own step folder names; anything else (a path to another run's step, absolute or
    through `..`, as a hand edit or a copied-in pointer may hold) names no step of this run, like a pointer naming a
    missing step: read_latest ignores it (it returned the other run's step), and the run's own steps decide."""
    from nanotronix.checkpoint import paths

    model = plain_model()
    opt = adamw(model)
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    save_single(run_dir, 1, model, opt)
    save_single(elsewhere, 4, model, opt)
    (run_dir / "latest").write_text(pointer.format(elsewhere=elsewhere) + "\n")
    assert paths.read_latest(run_dir) is None
    assert find_checkpoint(run_dir) == run_dir / "step_0000001"
    (run_dir / "latest").write_text("step_0000001\n")
    assert paths.read_latest(run_dir) == run_dir / "step_0000001"


def _damage_largest_data_file(folder: Path, how: str) -> Path:
    victim = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    if how == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(data)
    return victim


def test_a_step_whose_manifest_nests_past_json_is_pruned_by_the_current_settings(tmp_path):
    """Pruning reads each older step's manifest for the milestones it was saved with: one nested deeper than json's
    reader recurses (a RecursionError, not a ValueError) stopped the save that pruned; it is pruned as unreadable."""
    model = plain_model()
    opt = adamw(model)
    first = save_single(tmp_path / "run", 1, model, opt)
    (first / "checkpoint.json").write_text('{"config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    save_single(tmp_path / "run", 2, model, opt)
    save_single(tmp_path / "run", 3, model, opt, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("step_")) == ["step_0000003"]


@pytest.mark.parametrize("how, message", [("truncate", "truncated"), ("flip", "SHA-256")])
def test_damaged_file_is_named(trained, how, message):
    _, folder, _, _ = trained
    victim = _damage_largest_data_file(folder, how)
    model = plain_model()
    with pytest.raises(CheckpointError) as err:
        load_single(folder, model, adamw(model))
    assert str(victim) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_manifest_or_file(trained):
    _, folder, _, _ = trained
    (folder / "rng" / "rank_00000.pt").unlink()
    model = plain_model()
    with pytest.raises(CheckpointError, match="checkpoint file missing: .*rank_00000.pt"):
        load_single(folder, model, adamw(model))
    (folder / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: checkpoint.json is missing"):
        resolve_checkpoint(folder)


MANIFEST_EDITS = {  # an edit of a real manifest -> the words of the one line that refuses it
    "step gone": (lambda m: m.pop("step"), "is damaged: it has no step"),
    "step 4.5": (lambda m: m.update(step=4.5), "is damaged: step is 4.5, not a whole number in 0..2^63-1"),
    "step -1": (lambda m: m.update(step=-1), "is damaged: step is -1, not a whole number in 0..2^63-1"),
    "step text": (lambda m: m.update(step="3"), "is damaged: step is '3', not a whole number in 0..2^63-1"),
    "samples true": (lambda m: m.update(consumed_samples=True), "consumed_samples is True, not a whole number"),
    "data samples": (lambda m: m["data"].update(consumed_samples=-6), "data.consumed_samples is -6, not a whole"),
    "optimizer 1": (lambda m: m.update(optimizer=1), "optimizer is 1, not true or false"),
    "trainer_state null": (lambda m: m.update(trainer_state=None), "trainer_state is None, not a mapping"),
    "config gone": (lambda m: m.pop("config"), "is damaged: it holds no config with a model section"),
    "config list": (lambda m: m["config"].update(train=[]), "config.train is [], not a mapping"),
    # evaluate compares it with the store's tokenizer as a path: a TypeError traceback
    "tokenizer 5": (lambda m: m["config"].update(data={"tokenizer": 5}),
                    "config.data.tokenizer is 5, not a tokenizer's path or Hub id"),
    "file null": (lambda m: m["files"].update({".metadata": None}), "files['.metadata'] is None, not a mapping"),
    "size gone": (lambda m: m["files"][".metadata"].pop("size"),
                  "files['.metadata'].size is None, not a whole number in 0..2^63-1"),
    "size text": (lambda m: m["files"][".metadata"].update(size="12"),
                  "files['.metadata'].size is '12', not a whole number in 0..2^63-1"),
    "hash gone": (lambda m: m["files"][".metadata"].pop("sha256"),
                  "files['.metadata'].sha256 is None, not a SHA-256 (64 hex digits)"),
    "outside": (lambda m: m["files"].update({"../x": m["files"][".metadata"]}),
                "a file name in files is '../x', not a path inside the step folder"),
    "absolute": (lambda m: m["files"].update({"/etc/hostname": m["files"][".metadata"]}),
                 "a file name in files is '/etc/hostname', not a path inside the step folder"),
    "version 1.0": (lambda m: m.update(format_version=1.0), "format_version is 1.0, not a version number"),
    # torch.tensor(float(step)) of an AdamW state: an OverflowError traceback on resume
    "step 2^63": (lambda m: m.update(step=2 ** 63, optimizer_step=2 ** 63),
                  "is damaged: step is 9223372036854775808, not a whole number in 0..2^63-1"),
    # a resume picks the newest folder by name, then continued from the manifest's step: its saves were never newer
    "step of another folder": (lambda m: m.update(step=m["step"] + 2),
                               "is damaged: its step 5 is not its folder's (step_0000003)"),
    "updates past steps": (lambda m: m.update(optimizer_step=m["step"] + 1),
                           "is damaged: optimizer_step 4 is more than its step 3"),
}


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_an_edited_manifest_field_is_one_line_naming_it(trained, edit):
    """A hand-edited checkpoint.json whose field the readers use is of another type (or missing) is refused where it
    is read, naming the field, instead of a KeyError / TypeError deep in an export, a resume or inspect_checkpoint."""
    from nanotronix.checkpoint.manifest import read_manifest

    _, folder, _, _ = trained
    change, message = MANIFEST_EDITS[edit]
    manifest = json.loads((folder / "checkpoint.json").read_text())
    change(manifest)
    (folder / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as err:
        read_manifest(folder)
    assert message in str(err.value) and str(folder / "checkpoint.json") in str(err.value)


@pytest.mark.parametrize("recorded", ["interleaved", None, 1])
def test_a_rope_layout_other_than_the_models_is_refused_by_every_weight_reader(trained, recorded):
    """checkpoint.json records the RoPE layout (DESIGN.md) so that weights of another are not read as this model's:
    the export (CheckpointReader) and the resume (load_training_state) read them as rotate_half without a word."""
    from nanotronix.checkpoint.reader import CheckpointReader

    _, folder, _, _ = trained
    manifest = json.loads((folder / "checkpoint.json").read_text())
    manifest["rope_layout"] = recorded
    (folder / "checkpoint.json").write_text(json.dumps(manifest))
    message = f"checkpoint {folder}: rope_layout is {recorded!r}, but this nanotronix computes 'rotate_half'"
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(folder)
    assert str(err.value).startswith(message)
    model = plain_model()
    with pytest.raises(CheckpointError) as err:
        load_single(folder, model, adamw(model))
    assert str(err.value).startswith(message)


def test_a_manifest_nested_deeper_than_json_reads_is_not_valid_json(trained):
    """json's reader recurses per level: a manifest nested past that raised RecursionError, a traceback."""
    from nanotronix.checkpoint.manifest import read_manifest

    _, folder, _, _ = trained
    (folder / "checkpoint.json").write_text('{"format": [' + "[" * 100_000 + "]" * 100_000 + "]}")
    with pytest.raises(CheckpointError, match="is damaged: not valid JSON"):
        read_manifest(folder)


def test_damaged_checkpoint_cli_error_is_one_line(trained, tmp_path):
    _, folder, _, _ = trained
    victim = _damage_largest_data_file(folder, "flip")
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(folder), "--output",
                           str(tmp_path / "hf"), "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint file damaged: ") and str(victim) in lines[0]
    assert not (tmp_path / "hf").exists()


def test_model_mismatch_is_one_line(trained):
    from dataclasses import replace

    from nanotronix.checkpoint.checkpointer import check_architecture

    _, folder, _, _ = trained
    saved = json.loads((folder / "checkpoint.json").read_text())["config"]["model"]
    with pytest.raises(CheckpointError, match="model.num_hidden_layers=4, but the config has 2"):
        check_architecture(saved, vars(replace(TINY, num_hidden_layers=2)), folder)
    notes = check_architecture(saved, vars(replace(TINY, rope_theta=130000.0)), folder)
    assert notes == ["model.rope_theta: 10000.0 in the checkpoint, 130000.0 now"]
    # an imported config.json's 10**400 (which transformers takes): said by its length, not 401 digits
    notes = check_architecture({**saved, "max_position_embeddings": 10 ** 400}, vars(TINY), folder)
    assert notes == [f"model.max_position_embeddings: <an integer of 401 digits> in the checkpoint, "
                     f"{TINY.max_position_embeddings} now"]
    with pytest.raises(CheckpointError, match=r"model.vocab_size=<an integer of 401 digits>, but the config has"):
        check_architecture({**saved, "vocab_size": 10 ** 400}, vars(TINY), folder)
    wider = plain_model(replace(TINY, vocab_size=128))
    with pytest.raises(CheckpointError, match="embed_tokens.weight of shape"):
        load_single(folder, wider, adamw(wider))



def test_resume_notes_what_changes_the_data_order():
    """Moving the corpus with data.root following keeps every dataset's order (no note); another data seed, another
    seq_len or a dataset path spelled otherwise changes the coming samples, and resume says so."""
    from nanotronix.checkpoint.checkpointer import data_order_notes
    from nanotronix.config import config_from_dict

    def config(root, first="fineweb-edu", seed=1234, seq_len=2048, weight=0.6, decay_start=100):
        return config_from_dict({
            "model": {"preset": "smollm2-135m"}, "train": {"seq_len": seq_len},
            "data": {"root": root, "data_seed": seed, "stages": [
                {"name": "stable", "datasets": [{"path": first, "weight": weight},
                                                {"path": "stack-edu", "weight": 0.4}]},
                {"name": "decay", "start_step": decay_start, "datasets": [{"path": "stack-edu", "weight": 1.0}]}]},
        }).to_dict()

    saved = config("/old/mount")
    assert data_order_notes(saved, config("/new/cluster/corpus"), step=50) == []
    # a stage that has not begun may still change, its datasets too (the annealing branch adds one)
    assert data_order_notes(saved, config("/old/mount", decay_start=120), step=50) == []
    branch = config("/old/mount")
    branch["data"]["stages"][1]["datasets"] = [{"path": "finemath", "weight": 0.6},
                                               {"path": "/elsewhere/stack-edu", "weight": 0.4}]
    assert data_order_notes(saved, branch, step=50) == []
    notes = data_order_notes(saved, config("/new/cluster/corpus", first="/elsewhere/fineweb-edu", seed=7,
                                           seq_len=1024), step=50)
    assert [n.split(":")[0] for n in notes] == [
        "data.data_seed", "train.seq_len",
        "datasets (order keys, relative to data.root) of the stages begun by step 50 that the checkpoint's did not "
        "have",
        "the stages begun by step 50 differ from the checkpoint's (start steps, datasets or weights)"]
    assert "['/elsewhere/fineweb-edu']" in notes[2] and "no longer in them: ['fineweb-edu']" in notes[2]
    for changed in (config("/old/mount", weight=0.5), config("/old/mount", decay_start=40)):  # a begun blend
        notes = data_order_notes(saved, changed, step=50)
        assert [n.split(":")[0] for n in notes] == [
            "the stages begun by step 50 differ from the checkpoint's (start steps, datasets or weights)"]
        assert notes[0].endswith("(to change the blend from here on without that, keep the checkpoint's stages and "
                                 "add a stage with start_step 51)")
    # weights in other units but the same ratios (0.6 : 0.4 as 1.5 : 1.0) are the same blend, the same samples
    rescaled = config("/old/mount", weight=1.5)
    rescaled["data"]["stages"][0]["datasets"][1]["weight"] = 1.0
    assert data_order_notes(saved, rescaled, step=50) == []


def test_store_change_notes_one_per_store_and_none_for_checkpoints_without_fingerprints():
    """The loader's data stats as saved and now: a store read from with another token count gets the count's note
    alone (its fingerprint changed too), one with as many tokens but another fingerprint the content's note, one not
    read yet none; a checkpoint saved before fingerprints were kept resumes without a content note."""
    from nanotronix.checkpoint.checkpointer import store_change_notes

    read = {"datasets": {"web": {"consumed_tokens": 64}, "code": {"consumed_tokens": 64},
                         "math": {"consumed_tokens": 0}}}
    saved = {**read, "store_tokens": {"web": 1000, "code": 500, "math": 70},
             "store_fingerprints": {"web": "a" * 64, "code": "b" * 64, "math": "c" * 64}}
    now = {**read, "store_tokens": {"web": 1200, "code": 500, "math": 80},
           "store_fingerprints": {"web": "d" * 64, "code": "e" * 64, "math": "f" * 64}}
    notes = store_change_notes(saved, now)
    assert [n.split(":")[0] for n in notes] == ["dataset web", "dataset code"]
    assert "holds 1,200 tokens, 1,000 when the checkpoint was saved" in notes[0]
    assert "other tokens than when the checkpoint was saved (as many, but another content fingerprint" in notes[1]
    assert store_change_notes(saved, saved) == []
    old = {key: value for key, value in saved.items() if key != "store_fingerprints"}
    assert [n.split(":")[0] for n in store_change_notes(old, now)] == ["dataset web"]


def test_each_replicated_chunk_has_one_writer_and_the_bytes_are_balanced():
    """`assign_writers`: a chunk several ranks hold is written by exactly one of them, the writes spread evenly over
    the holders, and a chunk only one rank holds stays with it."""
    from nanotronix.checkpoint.state import assign_writers

    replicated = {f"model.layer{i}": ((-1, 0, (4,)), 16) for i in range(8)}
    own = [{"model.shard": ((0, r, (2, 4)), 32)} for r in range(4)]  # a TP shard per rank: different chunks
    writes = assign_writers([{**replicated, **own[r]} for r in range(4)])
    assert [len(w) for w in writes] == [3, 3, 3, 3]
    assert all("model.shard" in w for w in writes)
    replicated_writes = [w - {"model.shard"} for w in writes]
    assert set().union(*replicated_writes) == set(replicated)
    assert sum(len(w) for w in replicated_writes) == len(replicated)
    assert assign_writers([{**replicated, **own[r]} for r in range(4)]) == writes  # the same on every rank


@pytest.mark.parametrize("listed", [sorted, lambda paths: sorted(paths, reverse=True)],
                         ids=["listed_up", "listed_down"])
def test_two_folders_of_one_step_give_the_same_newest_step_in_any_listing_order(tmp_path, monkeypatch, listed):
    """A `step_4` copied in by hand beside the save's `step_0000004`: the run's newest step is the save's folder,
    whatever order the file system lists them in (it was the one listed last)."""
    from nanotronix.checkpoint import paths

    run_dir = tmp_path / "run"
    for name in ("step_0000003", "step_4", "step_0000004"):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / paths.MANIFEST_NAME).write_text("{}")
    iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(listed(list(iterdir(self)))))
    assert find_checkpoint(run_dir) == run_dir / "step_0000004"
    assert [p.name for p in paths.committed_steps(run_dir)] == ["step_0000003", "step_4", "step_0000004"]


def test_python_and_numpy_generators_continue_where_the_save_left_them(tmp_path):
    """rng.py saves Python's and NumPy's global generators beside torch's; a load must put them back (torch's alone
    is checked in test_checkpoint_storage.py). Reference: what each generator gives right after the save."""
    model = plain_model()
    opt = adamw(model)
    train_steps(model, opt, range(1, 2))
    random.seed(11)
    np.random.seed(12)
    random.random(), np.random.rand(3)  # somewhere in their streams, not at a seed
    folder = save_single(tmp_path / "run", 1, model, opt)
    expected_py, expected_np = [random.random() for _ in range(4)], np.random.rand(4)

    random.seed(0)
    np.random.seed(0)
    fresh = plain_model()
    assert load_single(folder, fresh, adamw(fresh))["_restored"]["rng"] is True
    assert [random.random() for _ in range(4)] == expected_py
    assert np.array_equal(np.random.rand(4), expected_np)


def test_a_damaged_rng_file_is_refused_before_it_is_unpickled(tmp_path):
    """The RNG file is listed in the manifest with its SHA-256 like the weights: a flipped byte in it (same size, so
    the cheap size check passes) is refused as a damaged file, one CheckpointError naming it, before torch.load reads
    it (unchecked, the load failed deep inside torch's zip reader, or restored whatever the bytes now say)."""
    model = plain_model()
    opt = adamw(model)
    train_steps(model, opt, range(1, 2))
    folder = save_single(tmp_path / "run", 1, model, opt)
    rng = folder / "rng" / "rank_00000.pt"
    data = bytearray(rng.read_bytes())
    data[len(data) // 2] ^= 0x01
    rng.write_bytes(bytes(data))
    fresh = plain_model()
    with pytest.raises(CheckpointError, match="rank_00000.pt does not match its SHA-256"):
        load_single(folder, fresh, adamw(fresh))


def test_a_resume_with_a_smaller_global_batch_size_is_refused_too():
    """A step's samples are [(s-1)*gbs, s*gbs): a checkpoint that consumed 16 samples in 2 steps (gbs 8) resumed with
    gbs 4 would read samples 8..15 again, as one with gbs 16 would skip some. Both are refused (only the larger one
    is run through the trainer in test_checkpoint_resume.py). Reference: that arithmetic."""
    from types import SimpleNamespace

    from nanotronix.checkpoint.checkpointer import check_resumed_position

    for gbs in (4, 16):
        with pytest.raises(CheckpointError, match=f"consumed 16 samples in 2 steps .global batch 8., but "
                                                  f"train.global_batch_size is {gbs}"):
            check_resumed_position(Path("ckpt"), 2, 16, SimpleNamespace(global_batch_size=gbs, train_steps=4))
    check_resumed_position(Path("ckpt"), 2, 16, SimpleNamespace(global_batch_size=8, train_steps=4))
