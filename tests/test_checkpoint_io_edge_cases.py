"""Checkpoint I/O guarantees that the other checkpoint tests left unchecked (cases a mutation review found):

- one user of a checkpoint.dir at a time (run_lock.py): two holders that both ask for the lock are refused, not only
  a second one meeting a holder that took it some other way; and tools/rollback.py is refused while a run holds the
  folder (a live run's next save would undo the rollback), moving nothing;
- `latest` is replaced durably (paths.write_text_durably): its new text is fsynced before the rename that publishes
  it, and the folder after that rename, else a power loss can leave an empty or old pointer;
- an asynchronous save's host buffers (staging.HostStaging) of pieces a rank no longer saves are let go, not kept
  (pinned on a GPU) for the run's life.
Each a few file operations in one process: ~2 s.
"""
from __future__ import annotations

import fcntl
import gc
import os
import time
import weakref

import pytest
import torch

from checkpoint_helpers import adamw, plain_model, renames_killed_after, save_single
from helpers import load_tool, record_file_system_calls

from nanotronix.checkpoint import CheckpointError, paths, run_lock
from nanotronix.checkpoint.staging import HostStaging
from nanotronix.checkpoint.state import LocalPiece


def test_two_users_asking_for_the_run_lock_are_not_both_let_in(tmp_path):
    """run_lock.acquire twice on one folder (two runs, or a run and tools/rollback.py, each through run_lock): the
    second is refused while the first holds it, and let in once the first closes its descriptor. A shared lock would
    let both in; the existing test only meets a holder that took LOCK_EX by hand."""
    said: list[str] = []
    first = run_lock.acquire(tmp_path, 0.0, said.append, "refused")
    assert first is not None
    try:
        with pytest.raises(CheckpointError, match=f"checkpoint.dir {tmp_path} is in use by another run"):
            run_lock.acquire(tmp_path, 0.0, said.append, "refused")
    finally:
        os.close(first)
    second = run_lock.acquire(tmp_path, 0.0, said.append, "refused")
    assert second is not None
    os.close(second)


def test_the_rollback_tool_is_refused_while_a_run_holds_the_folder(tmp_path, capsys):
    """tools/rollback.py under a live run (which holds RUN_DIR/.lock, as Checkpointer does: an exclusive flock) is
    refused in one line and moves nothing: the run's next save would otherwise undo the rollback."""
    run_dir = tmp_path / "run"
    model = plain_model()
    opt = adamw(model)
    for step in (1, 2, 3):
        save_single(run_dir, step, model, opt)
    before = sorted(p.name for p in run_dir.iterdir() if p.name != paths.LOCK_NAME)
    with open(run_dir / paths.LOCK_NAME, "a+") as live_run:
        fcntl.flock(live_run, fcntl.LOCK_EX)
        code = load_tool("rollback").main([str(run_dir), "--to-step", "1"])
    assert code != 0
    assert "is in use by another run" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir() if p.name != paths.LOCK_NAME) == before
    assert (run_dir / "latest").read_text() == "step_0000003\n"


def test_latest_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """write_text_durably (how `latest` is replaced): the temp file's data reaches the disk before os.replace makes
    it the pointer, and the folder is fsynced after the replace (POSIX: a rename is durable only then)."""
    events = record_file_system_calls(monkeypatch)
    pointer = tmp_path / "latest"
    paths.write_text_durably(pointer, "step_0000001\n")
    temp = str(tmp_path / f".latest.tmp-{os.getpid()}")
    replaced = events.index(("replace", temp, str(pointer)))
    assert ("fsync", temp) in events[:replaced], events
    assert ("fsync", str(tmp_path)) in events[replaced + 1:], events
    assert pointer.read_text() == "step_0000001\n"


def test_staging_buffers_of_pieces_no_longer_saved_are_freed():
    """HostStaging keeps a buffer per key for reuse, but a key the rank no longer saves (its writer assignment
    changed) must not keep its buffer (~1/N of the checkpoint, pinned on a GPU) alive for the rest of the run."""
    staging = HostStaging()
    a, b = torch.arange(6.0), torch.arange(4.0)
    staged = staging.stage({"a": LocalPiece(a, None), "b": LocalPiece(b, None)})
    assert torch.equal(staged["b"].tensor, b) and staged["b"].tensor.data_ptr() != b.data_ptr()
    gone = weakref.ref(staged["b"].tensor)
    kept = staged["a"].tensor.data_ptr()
    del staged
    staged = staging.stage({"a": LocalPiece(a + 1, None)})
    gc.collect()
    assert staged["a"].tensor.data_ptr() == kept  # reused
    assert gone() is None, "the buffer of a key no longer staged is still held"


def test_a_rollbacks_moves_are_durable_before_latest_names_the_step(tmp_path, monkeypatch):
    """paths.roll_back: the later steps' moves aside are fsynced (the run folder) before `latest` is replaced, so a
    power loss cannot keep the new `latest` yet bring back the later steps beside it (paths.py: "never `latest` on
    `step` beside later steps that a resume would take"); the replace's own folder fsync comes after it."""
    run_dir = tmp_path / "run"
    model = plain_model()
    opt = adamw(model)
    for step in (1, 2, 3):
        save_single(run_dir, step, model, opt)
    events = record_file_system_calls(monkeypatch)
    aside, moved = paths.roll_back(run_dir, 1)
    assert [p.name for p in moved] == ["step_0000002", "step_0000003"]
    last_move = max(i for i, e in enumerate(events) if e[0] == "rename" and e[2].startswith(str(aside)))
    pointer = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(run_dir / "latest"))
    assert ("fsync", str(run_dir)) in events[last_move + 1:pointer], events
    assert (run_dir / "latest").read_text() == "step_0000001\n"


def test_the_start_up_marker_is_removed_from_checkpoint_dir(tmp_path):
    """create_run_folders leaves a `.nanotronix-shared-*` marker in checkpoint.dir for the other ranks to look for,
    and rank 0 removes it once they have: every start (every requeue) must not leave one more file among the steps.
    Only test_two_nodes.py (two machines' worth of torchrun) checked this; here in one process."""
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.config import load_config
    from nanotronix.train.run_folders import MARKER_PREFIX, create_run_folders
    from helpers import tiny_config, write_learnable_store

    store = write_learnable_store(tmp_path / "store" / "arith")
    ckpt = tmp_path / "ckpt"
    create_run_folders(load_config(tiny_config(tmp_path, store, checkpoint={"dir": str(ckpt)})),
                       Collective(single_process=True))
    assert ckpt.is_dir() and not list(ckpt.glob(f"{MARKER_PREFIX}*")), list(ckpt.iterdir())


def _rolled_back_and_trained_again(tmp_path, monkeypatch):
    """Steps 1-3 saved, rolled back to step 1 at 2026-01-01 00:00:00 (steps 2 and 3 into that rollback's folder),
    then steps 2 and 3 saved again: (the run folder, the first rollback's folder)."""
    run_dir = tmp_path / "run"
    model = plain_model()
    opt = adamw(model)
    for step in (1, 2, 3):
        save_single(run_dir, step, model, opt)
    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000000")
    first, _ = paths.roll_back(run_dir, 1)
    for step in (2, 3):
        save_single(run_dir, step, model, opt)
    return run_dir, first


def test_a_second_rollback_cut_short_resumes_in_its_own_folder_not_an_older_ones(tmp_path, monkeypatch):
    """Rolled back to step 1 (steps 2, 3 aside in folder A), trained to step 3 again, rolled back to step 1 again and
    killed after its first move (step 3 into folder B, `latest` still on step 3): run again, it must finish in B, the
    newest cut-short folder. A also holds a `step_0000003` and no longer sees it in the run, so it looks cut short
    too; finishing there would put the new step 2 onto A's old one."""
    run_dir, first = _rolled_back_and_trained_again(tmp_path, monkeypatch)
    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000100")
    with renames_killed_after(1), pytest.raises(KeyboardInterrupt):
        paths.roll_back(run_dir, 1)
    monkeypatch.setattr(time, "strftime", lambda *_: "20260101-000101")
    again, moved = paths.roll_back(run_dir, 1)
    assert again.name.endswith("-20260101-000100") and again != first
    assert sorted(p.name for p in again.iterdir()) == ["step_0000002", "step_0000003"]
    assert sorted(p.name for p in first.iterdir()) == ["step_0000002", "step_0000003"]
    assert paths.read_latest(run_dir) == run_dir / "step_0000001"


def test_two_rollbacks_to_one_step_within_a_second_each_get_a_folder(tmp_path, monkeypatch):
    """The aside folder is named for the second: a script that rolls back to step 1, trains steps 2 and 3 again and
    rolls back again within that second shared the first rollback's folder, whose step_0000003 made the second one's
    first move fail ("Directory not empty"). It gets `-2`, and each folder keeps the steps it was given."""
    run_dir, first = _rolled_back_and_trained_again(tmp_path, monkeypatch)
    second, moved = paths.roll_back(run_dir, 1)
    assert (first.name, second.name) == ("rolled_back_after_step_0000001-20260101-000000",
                                         "rolled_back_after_step_0000001-20260101-000000-2")
    assert [p.name for p in moved] == ["step_0000002", "step_0000003"]
    for aside in (first, second):
        assert sorted(p.name for p in aside.iterdir()) == ["step_0000002", "step_0000003"]
    assert paths.read_latest(run_dir) == run_dir / "step_0000001"
