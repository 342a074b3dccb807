"""Checkpoint storage: exact round trip, `latest` and retention, crashes injected mid-save (in one process, and one
rank of two killed), damaged files reported as one line naming the file. Costs ~15 s of CPU (short subprocesses)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    torch.manual_seed(123)
    rng_after_save = torch.rand(3)  # what the generator gives right after the save ...
    uninterrupted = train_steps(model, opt, range(4, 8))

    model2 = plain_model(seed=99)  # a different init: everything must come from the checkpoint
    opt2 = adamw(model2)
    torch.manual_seed(5)
    manifest = load_single(folder, model2, opt2)
    assert manifest["_restored"] == {"optimizer": True, "rng": True}
    assert manifest["step"] == 3 and manifest["consumed_samples"] == 6 and manifest["optimizer_step"] == 3
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), rng_after_save)
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


def test_every_name_in_a_saved_step_is_durable(tmp_path, monkeypatch):
    """Each folder of a committed step is fsynced after the names in it were made (a file's data fsynced is not
    its name: after a power loss, a step that `latest` names could lack its rank's RNG file), and so is each folder
    holding a level of the run folder that the save made (`mkdir -p`: the run could vanish with all its steps)."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(Path(os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    model = plain_model()
    run_dir = tmp_path / "new" / "levels" / "run"
    folder = save_single(run_dir, 1, model, adamw(model))
    written_as = run_dir / ".step_0000001.tmp"  # renamed into place once complete
    folders = [written_as / sub.relative_to(folder) for sub in [folder, *folder.rglob("*")] if sub.is_dir()]
    assert len(folders) >= 2 and all(sub in synced for sub in folders), (folders, synced)
    assert {tmp_path, tmp_path / "new", tmp_path / "new" / "levels"} <= set(synced), synced


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


def test_milestones_are_never_pruned(tmp_path):
    """keep_last 2 with checkpoint.keep_every 3 and keep_steps [5]: after steps 1-10 the milestones 3, 5, 6, 9 stay
    with the newest two (9, 10)."""
    model = plain_model()
    opt = adamw(model)
    for step in range(1, 11):
        save_single(tmp_path / "run", step, model, opt, keep_last=2, keep_every=3, keep_steps=(5,))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "latest", "step_0000003", "step_0000005", "step_0000006", "step_0000009", "step_0000010"]


def test_a_prune_cut_short_is_finished_by_the_next_save(tmp_path, monkeypatch):
    """A prune killed inside its rmtree (or one that files held open on NFS stop): the pruned step is already out of
    the step pattern (`.step_N.pruning`), and the next save removes what is left of it; before, a step folder
    without its manifest stayed on disk for good (up to a whole checkpoint, ~20 GB at 1.7B), seen by nothing."""
    import shutil

    from nanotronix.checkpoint import paths

    model = plain_model()
    opt = adamw(model)
    for step in (1, 2):
        save_single(tmp_path / "run", step, model, opt, keep_last=1)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # the deletion never happens
    save_single(tmp_path / "run", 3, model, opt, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".step_0000002.pruning", "latest", "step_0000003"]
    assert [paths.step_of(p) for p in paths.committed_steps(tmp_path / "run")] == [3]
    monkeypatch.undo()
    save_single(tmp_path / "run", 4, model, opt, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest", "step_0000004"]


def test_a_kill_between_the_commit_rename_and_the_pointer_update_resumes_the_new_step(tmp_path, monkeypatch):
    """Killed after step 2's folder was renamed into place (the commit: fsynced, complete) but before `latest` was
    replaced: the resume takes step 2, not the step `latest` still names (before, a whole checkpoint interval was
    trained again), and the next save removes the pointer's temp file the kill left behind."""
    from nanotronix.checkpoint import paths
    from nanotronix.checkpoint.checkpointer import choose_resume_source

    model = plain_model()
    opt = adamw(model)
    run_dir = tmp_path / "run"
    save_single(run_dir, 1, model, opt)
    train_steps(model, opt, range(2, 3))
    real_replace = os.replace

    def killed_at_the_pointer(src, dst, *args, **kwargs):
        if Path(dst).name == paths.LATEST_NAME:
            raise KeyboardInterrupt("killed before `latest` moved")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", killed_at_the_pointer)
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # the killed process (the next run has another pid)
    with pytest.raises(KeyboardInterrupt):
        save_single(run_dir, 2, model, opt)
    monkeypatch.undo()
    assert sorted(p.name for p in run_dir.iterdir()) == [".latest.tmp-4242", "latest", "step_0000001", "step_0000002"]
    assert (run_dir / "latest").read_text() == "step_0000001\n"
    assert find_checkpoint(run_dir) == choose_resume_source(run_dir, "auto", print) == run_dir / "step_0000002"
    fresh = plain_model(seed=5)
    assert load_single(find_checkpoint(run_dir), fresh, adamw(fresh))["step"] == 2
    save_single(run_dir, 3, model, opt)
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step_0000001", "step_0000002", "step_0000003"]


def test_a_rollback_cut_short_never_leaves_latest_behind_the_step_resumed_from(tmp_path, monkeypatch):
    """tools/rollback.py killed part-way: `latest` names the step a resume takes, or none (stale), never an earlier
    one beside later steps that the resume takes anyway; run again, it finishes the rollback."""
    from nanotronix.checkpoint import paths

    model = plain_model()
    opt = adamw(model)
    run_dir = tmp_path / "run"
    for step in range(1, 5):
        save_single(run_dir, step, model, opt)
    real_rename, renamed = os.rename, []

    def killed_after_one_move(src, dst):
        if renamed:
            raise KeyboardInterrupt("killed mid-rollback")
        renamed.append(src)
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_after_one_move)
    with pytest.raises(KeyboardInterrupt):
        paths.roll_back(run_dir, 1)
    monkeypatch.undo()
    assert paths.read_latest(run_dir) in (None, find_checkpoint(run_dir))
    assert [paths.step_of(p) for p in paths.committed_steps(run_dir)] == [1, 2, 3]  # the newest moved first
    aside, moved = paths.roll_back(run_dir, 1)
    assert [p.name for p in moved] == ["step_0000002", "step_0000003"]
    assert find_checkpoint(run_dir) == paths.read_latest(run_dir) == run_dir / "step_0000001"
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000002", "step_0000003", "step_0000004"]


def test_a_pruned_step_is_renamed_durably_before_its_files_go(tmp_path, monkeypatch):
    """Pruning renames a step out of the step pattern, fsyncs the run folder, and only then deletes the files: a
    power loss between the two cannot bring back `step_N` without its files (ext4 may persist the deletions first)."""
    import shutil

    from nanotronix.checkpoint import paths

    events = []
    model = plain_model()
    opt = adamw(model)
    save_single(tmp_path / "run", 1, model, opt, keep_last=1)
    real_fsync, real_rename, real_rmtree = os.fsync, os.rename, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (events.append(("rmtree", str(p))),
                                                               real_rmtree(p, *a, **k))[1])
    save_single(tmp_path / "run", 2, model, opt, keep_last=1)
    run_dir = str(tmp_path / "run")
    doomed = f"{run_dir}/.step_0000001.pruning"
    renamed = events.index(("rename", f"{run_dir}/step_0000001", doomed))
    assert ("fsync", run_dir) in events[renamed:events.index(("rmtree", doomed))], events
    assert [paths.step_of(p) for p in paths.committed_steps(tmp_path / "run")] == [2]


def test_a_step_is_durable_before_its_rename_and_the_rename_before_latest(tmp_path, monkeypatch):
    """The order a power loss needs: every file of the step fsynced (DCP's `.metadata` as the temp file it renames),
    then its folder, then the rename into place, the run folder fsynced, and only then `latest` replaced."""
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b))[1])
    model = plain_model()
    folder = save_single(tmp_path / "run", 1, model, adamw(model))
    temp, run_dir = str(tmp_path / "run" / ".step_0000001.tmp"), str(tmp_path / "run")
    commit = events.index(("rename", temp, str(folder)))
    synced_before = {e[1] for e in events[:commit] if e[0] == "fsync"}
    for name in [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]:
        assert {f"{temp}/{name}", f"{temp}/{name}.tmp"} & synced_before, name
    folder_synced = [i for i, e in enumerate(events[:commit]) if e == ("fsync", temp)]
    files_synced = [i for i, e in enumerate(events[:commit]) if e[0] == "fsync" and e[1] != temp]
    assert folder_synced and folder_synced[-1] > files_synced[-1]  # the folder after the names made in it
    pointer = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == f"{run_dir}/latest")
    assert commit < events.index(("fsync", run_dir)) < pointer
    assert ("fsync", str(tmp_path)) in events[:pointer]  # the run folder's own entry (new with its first step)


@pytest.mark.parametrize("kind", ["tmp", "replaced", "pruning"])
def test_a_saves_hidden_folder_is_never_a_checkpoint_even_with_its_manifest(tmp_path, kind):
    """checkpoint.resume or a tool pointed at `.step_N.tmp` (killed between its manifest and its commit rename),
    `.replaced` or `.pruning` (files being deleted in any order): refused, not loaded as a step."""
    model = plain_model()
    folder = save_single(tmp_path / "run", 1, model, adamw(model))
    hidden = folder.parent / f".{folder.name}.{kind}"
    folder.rename(hidden)
    assert (hidden / "checkpoint.json").is_file()
    assert find_checkpoint(hidden) is None and find_checkpoint(tmp_path / "run") is None
    with pytest.raises(CheckpointError, match="is not a committed checkpoint"):
        resolve_checkpoint(hidden)


KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from checkpoint_helpers import adamw, plain_model, save_single, train_steps

run_dir = Path(sys.argv[1])
model = plain_model()
opt = adamw(model)
train_steps(model, opt, range(1, 2))
save_single(run_dir, 1, model, opt)
train_steps(model, opt, range(2, 3))
real_fsync = os.fsync
# SIGKILL inside DCP's write of step 2: right after its first data file reaches the disk.
os.fsync = lambda fd: (real_fsync(fd), os.kill(os.getpid(), signal.SIGKILL))
save_single(run_dir, 2, model, opt)
print("not killed")
"""


def _check_previous_survives(run_dir: Path) -> None:
    assert (run_dir / ".step_0000002.tmp").is_dir()  # the interrupted save left only its temp folder
    assert (run_dir / "latest").read_text().strip() == "step_0000001"
    assert find_checkpoint(run_dir) == run_dir / "step_0000001"
    model = plain_model(seed=5)
    assert load_single(find_checkpoint(run_dir), model, adamw(model))["step"] == 1
    save_single(run_dir, 2, model, adamw(model))  # the next save cleans the debris up
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step_0000001", "step_0000002"]


def test_sigkill_during_the_write_keeps_previous_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT / "tests")
    assert proc.returncode == -9, proc.stdout + proc.stderr
    _check_previous_survives(tmp_path / "run")


ONE_OF_TWO_RANKS_KILLED = """
import os, signal, sys
from datetime import timedelta
from pathlib import Path
import torch, torch.distributed as dist
from nanotronix.checkpoint import paths, rng, storage

rank, run_dir, rendezvous = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=60))
coll = storage.Collective()

def save(step):
    state = {f"w{rank}": torch.full((1000,), float(step))}  # a piece per rank: each writes a data file
    storage.write_step(run_dir, step, state, {"step": step}, rng.capture_rng(), rank, coll, paths.Retention())

save(1)
if rank == 1:  # SIGKILLed once its step-2 files are all written and fsynced, before it says so to rank 0
    real_save_rng = rng.save_rng
    rng.save_rng = lambda *a: (real_save_rng(*a), os.kill(os.getpid(), signal.SIGKILL))
try:
    save(2)
except BaseException as e:
    print(f"rank {rank}: {type(e).__name__}", flush=True)
    os._exit(3)
os._exit(0)
"""


def test_one_rank_killed_mid_save_leaves_no_committed_step(tmp_path):
    """Two ranks save; rank 1 is SIGKILLed after its files of step 2 are durable but before it reports them, when
    DCP's own `.metadata` already makes the folder look finished: rank 0 fails instead of committing (a step is
    renamed into place only once every rank said its files are written), and step 1 stays the one resumed from."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "-c", ONE_OF_TWO_RANKS_KILLED, str(r), str(run_dir),
                               str(tmp_path / "rendezvous")], cwd=ROOT / "tests", env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [proc.communicate(timeout=120)[0] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [3, -9], outs
    assert (run_dir / ".step_0000002.tmp" / ".metadata").is_file(), outs  # DCP had finished on both ranks
    assert sorted(p.name for p in run_dir.iterdir()) == [".step_0000002.tmp", "latest", "step_0000001"]
    assert find_checkpoint(run_dir) == run_dir / "step_0000001"


@pytest.mark.parametrize("where", ["before the manifest", "before the rename"])
def test_crash_before_commit_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    """The later crash points, as an exception at that point (what a kill there leaves on disk is the same:
    the save has no clean-up to skip)."""
    import nanotronix.checkpoint.manifest as mf
    import nanotronix.checkpoint.paths as paths

    model = plain_model()
    opt = adamw(model)
    train_steps(model, opt, range(1, 2))
    save_single(tmp_path / "run", 1, model, opt)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("injected crash")

    monkeypatch.setattr(mf if where == "before the manifest" else paths,
                        "write_manifest" if where == "before the manifest" else "commit_step", crash)
    with pytest.raises(KeyboardInterrupt):
        save_single(tmp_path / "run", 2, model, opt)
    monkeypatch.undo()
    _check_previous_survives(tmp_path / "run")


def _damage_largest_data_file(folder: Path, how: str) -> Path:
    victim = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    if how == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(data)
    return victim


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
    # a stage that has not begun may still change
    assert data_order_notes(saved, config("/old/mount", decay_start=120), step=50) == []
    notes = data_order_notes(saved, config("/new/cluster/corpus", first="/elsewhere/fineweb-edu", seed=7,
                                           seq_len=1024), step=50)
    assert [n.split(":")[0] for n in notes] == [
        "data.data_seed", "train.seq_len",
        "datasets (order keys, relative to data.root) not in the checkpoint's config",
        "the stages begun by step 50 differ from the checkpoint's (start steps, datasets or weights)"]
    assert "['/elsewhere/fineweb-edu']" in notes[2] and "no longer configured: ['fineweb-edu']" in notes[2]
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
