"""Crash safety of checkpoint saves: what a save, a prune or a rollback killed part-way leaves behind (in one
process, and one rank of two killed), and the fsync order that makes a committed step survive a power loss (each
file and folder durable before the rename that commits it, the rename before `latest`). Costs ~10 s of CPU (short
subprocesses)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint_helpers import adamw, load_single, plain_model, renames_killed_after, save_single, train_steps
from helpers import ROOT, record_file_system_calls, two_gloo_ranks

from nanotronix.checkpoint import CheckpointError, find_checkpoint, resolve_checkpoint


def test_every_name_in_a_saved_step_is_durable(tmp_path, monkeypatch):
    """Each folder of a committed step is fsynced after the names in it were made (a file's data fsynced is not
    its name: after a power loss, a step that `latest` names could lack its rank's RNG file), and so is each folder
    holding a level of the run folder that the save made (`mkdir -p`: the run could vanish with all its steps)."""
    calls = record_file_system_calls(monkeypatch)
    model = plain_model()
    run_dir = tmp_path / "new" / "levels" / "run"
    folder = save_single(run_dir, 1, model, adamw(model))
    written_as = run_dir / ".step_0000001.tmp"  # renamed into place once complete
    folders = [written_as / sub.relative_to(folder) for sub in [folder, *folder.rglob("*")] if sub.is_dir()]
    synced = {Path(e[1]) for e in calls if e[0] == "fsync"}
    assert len(folders) >= 2 and all(sub in synced for sub in folders), (folders, synced)
    assert {tmp_path, tmp_path / "new", tmp_path / "new" / "levels"} <= synced, synced


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


def saved_steps(run_dir: Path, last: int) -> Path:
    """RUN_DIR holding steps 1 to LAST of the plain model (the rollback tests' run)."""
    model = plain_model()
    opt = adamw(model)
    for step in range(1, last + 1):
        save_single(run_dir, step, model, opt)
    return run_dir


def test_a_rollback_cut_short_never_leaves_latest_behind_the_step_resumed_from(tmp_path):
    """tools/rollback.py killed part-way: `latest` names the step a resume takes, or none (stale), never an earlier
    one beside later steps that the resume takes anyway; run again, it finishes the rollback."""
    from nanotronix.checkpoint import paths

    run_dir = saved_steps(tmp_path / "run", 4)
    with renames_killed_after(1), pytest.raises(KeyboardInterrupt):
        paths.roll_back(run_dir, 1)
    assert paths.read_latest(run_dir) in (None, find_checkpoint(run_dir))
    assert [paths.step_of(p) for p in paths.committed_steps(run_dir)] == [1, 2, 3]  # the newest moved first
    aside, moved = paths.roll_back(run_dir, 1)
    assert [p.name for p in moved] == ["step_0000002", "step_0000003"]
    assert find_checkpoint(run_dir) == paths.read_latest(run_dir) == run_dir / "step_0000001"
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000002", "step_0000003", "step_0000004"]


def test_a_rollback_finds_a_step_folder_of_any_padding(tmp_path):
    """`step_2` (copied in by hand) is a committed step like `step_0000002`: a rollback to 2 takes it (it said "no
    complete checkpoint of step 2 (committed steps: 1, 2, 3)")."""
    from nanotronix.checkpoint import paths

    run_dir = saved_steps(tmp_path / "run", 3)
    (run_dir / "step_0000002").rename(run_dir / "step_2")
    aside, moved = paths.roll_back(run_dir, 2)
    assert [p.name for p in moved] == ["step_0000003"] and find_checkpoint(run_dir) == run_dir / "step_2"


def test_a_pruned_step_is_renamed_durably_before_its_files_go(tmp_path, monkeypatch):
    """Pruning renames a step out of the step pattern, fsyncs the run folder, and only then deletes the files: a
    power loss between the two cannot bring back `step_N` without its files (ext4 may persist the deletions first)."""
    from nanotronix.checkpoint import paths

    model = plain_model()
    opt = adamw(model)
    save_single(tmp_path / "run", 1, model, opt, keep_last=1)
    events = record_file_system_calls(monkeypatch)
    save_single(tmp_path / "run", 2, model, opt, keep_last=1)
    run_dir = str(tmp_path / "run")
    doomed = f"{run_dir}/.step_0000001.pruning"
    renamed = events.index(("rename", f"{run_dir}/step_0000001", doomed))
    assert ("fsync", run_dir) in events[renamed:events.index(("rmtree", doomed))], events
    assert [paths.step_of(p) for p in paths.committed_steps(tmp_path / "run")] == [2]


def test_a_step_is_durable_before_its_rename_and_the_rename_before_latest(tmp_path, monkeypatch):
    """The order a power loss needs: every file of the step fsynced (DCP's `.metadata` as the temp file it renames),
    then its folder, then the rename into place, the run folder fsynced, and only then `latest` replaced."""
    events = record_file_system_calls(monkeypatch)
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
    ranks = two_gloo_ranks(ONE_OF_TWO_RANKS_KILLED, tmp_path, timeout=120)
    outs = [out for _, out in ranks]
    assert [code for code, _ in ranks] == [3, -9], outs
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


def test_the_rollback_tool_checks_and_names_the_step_folder_of_any_padding(tmp_path, capsys):
    """tools/rollback.py checks the sizes of the folder it goes back to, `step_2` as well as `step_0000002` (a
    truncated `step_2` was gone back to unchecked), and names the folder `latest` names (it said step_0000002)."""
    from helpers import load_tool
    rollback = load_tool("rollback")
    run_dir = saved_steps(tmp_path / "run", 3)
    (run_dir / "step_0000002").rename(run_dir / "step_2")
    damaged = max((run_dir / "step_2").glob("*.distcp"), key=lambda p: p.stat().st_size)
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[:-10])
    assert rollback.main([str(run_dir), "--to-step", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint file damaged: {damaged} has ")
    assert (run_dir / "latest").read_text() == "step_0000003\n" and (run_dir / "step_0000003").is_dir()
    damaged.write_bytes(whole)
    assert rollback.main([str(run_dir), "--to-step", "2"]) == 0
    assert "to step 2: latest -> step_2; 1 later step(s) (3) moved to" in capsys.readouterr().out
    assert (run_dir / "latest").read_text() == "step_2\n"


@pytest.mark.parametrize("moves_before_the_kill", [0, 1, 2])
def test_a_rollback_run_again_after_a_kill_finishes_in_the_folder_it_began(tmp_path, monkeypatch,
                                                                             moves_before_the_kill):
    """Killed after 0, 1 or 2 of its 3 moves and run again a second later, a rollback puts the steps it had left into
    the folder it began (a second one held the rest, and the folder its line names lacked the newest steps; killed
    before any move, an empty folder stayed). A later rollback to the same step, once finished, gets its own."""
    from nanotronix.checkpoint import paths

    run_dir = saved_steps(tmp_path / "run", 4)
    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000000")
    with renames_killed_after(moves_before_the_kill), pytest.raises(KeyboardInterrupt):
        paths.roll_back(run_dir, 1)
    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000001")  # run again a second later
    aside, moved = paths.roll_back(run_dir, 1)
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("rolled_back_")] == [aside.name]
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000002", "step_0000003", "step_0000004"]
    assert paths.read_latest(run_dir) == run_dir / "step_0000001"
    model = plain_model()
    save_single(run_dir, 2, model, adamw(model))  # the resumed run saves again, and is rolled back again
    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000002")
    again, _ = paths.roll_back(run_dir, 1)
    assert again != aside and [p.name for p in again.iterdir()] == ["step_0000002"]
