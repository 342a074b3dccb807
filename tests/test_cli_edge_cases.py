"""Command-edge guarantees that the other CLI tests left unchecked (cases a mutation review of cli.py, data/files.py,
train/run_folders.py and the tools' argument handling found):

- a command stopped by SIGTERM exits 128 + 15 = 143, what a shell reports for a process SIGTERM ended (a scheduler
  or a wrapper script tells "terminated" from "Ctrl-C" by it), and leaves no half-written output;
- a rank of a multi-node run that does not see rank 0's marker in checkpoint.dir (a node-local disk) is refused at
  start-up: only test_two_nodes.py (two machines' worth of torchrun) checked it;
- a stop before replace_file's rename is not said to have left a whole output;
- what is not this command's own is never removed: a staging file of a live process of another user (EPERM), of
  another host (any host name), or not exactly a staging name; a folder level another process made meanwhile; a
  file someone put in a folder this command made;
- commit(replace=False) leaves an output that appeared meanwhile, and a failed folder rename puts the older back.
- a process whose local rank has no GPU on its node is refused in one line (auto or cuda), not torch's traceback.
Each a few file operations in one process: well under a second apiece (after the imports).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nanotronix.cli import one_line_errors, replace_file
from nanotronix.errors import UserError
from nanotronix.train.run_folders import MARKER_PREFIX, create_run_folders  # (torch.distributed: the import's cost)


def test_sigterm_during_a_write_exits_143_and_leaves_nothing(tmp_path, capsys):
    """SIGTERM (kill, timeout, scancel) while `replace_file` writes: the command says `terminated`, exits with the
    shell's code for a SIGTERM death (128 + SIGTERM), not Ctrl-C's 130, and neither the output nor its hidden
    staging file nor the folder made for it is left."""
    out = tmp_path / "new" / "out.txt"

    def write(temp: str) -> None:
        Path(temp).write_text("half of it")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in this frame long before

    @one_line_errors
    def tool() -> int:
        replace_file(out, write)
        return 0

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # else one_line_errors leaves SIGTERM to its handler
    assert tool() == 128 + int(signal.SIGTERM)
    assert capsys.readouterr().err == "terminated\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back as it was


class _RankOne:
    """The Collective of rank 1 of two, in one process: rank 0's broadcast carries the name of a marker it wrote (on
    its own node's disk, which this rank does not see), and the all-gather returns this rank's answer alone."""
    rank = 1

    def __init__(self, marker: str):
        self.marker = marker

    def broadcast(self, obj):
        return None, self.marker

    def all_gather(self, obj):
        return [None, obj]


def test_a_rank_that_does_not_see_rank_0s_marker_is_refused(tmp_path):
    """checkpoint.dir on a node-local disk: rank 1 never sees the marker rank 0 wrote, and create_run_folders raises
    one UserError saying the folder is not shared (every rank would otherwise save its shards to its own node)."""
    # the two fields create_run_folders reads (a whole Config would cost a store and a tokenizer: seconds)
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(dir=str(tmp_path / "ckpt")),
                          logging=SimpleNamespace(dir=str(tmp_path / "logs")))
    with pytest.raises(UserError, match="is not one folder shared by every node") as said:
        create_run_folders(cfg, _RankOne(f"{MARKER_PREFIX}0123"), marker_wait=0.3)
    assert said.value.every_rank
    # and one that does see it passes
    (tmp_path / "ckpt" / f"{MARKER_PREFIX}4567").write_text("host")
    create_run_folders(cfg, _RankOne(f"{MARKER_PREFIX}4567"), marker_wait=0.3)


def test_a_stop_before_replace_files_rename_is_not_said_to_be_whole(tmp_path, capsys, monkeypatch):
    """Ctrl-C after `write` finished but before the rename put it in place: the output is NOT there, so the command
    must say plain `interrupted` (130) and leave nothing, not "once the output was complete: ... is written whole"
    (which tells the user to trust a file that does not exist). Only a stop after the rename may say that."""
    import nanotronix.cli

    def commit_stopped(temp, final):  # stopped inside commit, before its rename
        raise KeyboardInterrupt()

    monkeypatch.setattr(nanotronix.cli, "commit", commit_stopped)
    target = tmp_path / "tok.json"

    @one_line_errors
    def tool() -> int:
        replace_file(target, lambda temp: Path(temp).write_text("x"))
        return 0

    assert tool() == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_a_temp_of_a_live_process_this_user_may_not_signal_is_kept(tmp_path, monkeypatch):
    """remove_abandoned_temps asks `kill(pid, 0)` whether a writer is alive; EPERM means a live process of another
    user (a shared project folder), whose staging file must stay. Only ESRCH (no such process) makes it a leftover."""
    from nanotronix.data import files

    def kill(pid, sig):
        if pid == 4242:
            raise PermissionError(1, "Operation not permitted")
        if pid == 4343:
            raise ProcessLookupError(3, "No such process")
        return None

    monkeypatch.setattr(files.os, "kill", kill)
    for pid in (4242, 4343):
        (tmp_path / f".out.tmp-{pid}").write_text("x\n")
    assert files.remove_abandoned_temps(tmp_path / "out") == [tmp_path / ".out.tmp-4343"]
    assert [p.name for p in tmp_path.iterdir()] == [".out.tmp-4242"]


def test_a_level_another_process_made_meanwhile_is_not_removed_as_ours(tmp_path, monkeypatch):
    """`make_folder_durably` returns only the levels it made: one another process created between the look and the
    mkdir (two ranks or two tools making one output tree) is theirs. Listed as ours, a failure here would rmdir it
    under the other process (which then fails writing into it)."""
    from nanotronix.data import files

    theirs, ours = tmp_path / "shared", tmp_path / "shared" / "mine"
    real = files.missing_levels

    def raced(folder):
        levels = real(folder)  # [mine, shared]: both missing when looked at ...
        theirs.mkdir()  # ... and then another process makes `shared`
        return levels

    monkeypatch.setattr(files, "missing_levels", raced)
    assert files.make_folder_durably(ours) == [ours]
    files.remove_made_folders([ours])
    assert theirs.is_dir() and not ours.exists()


def test_only_names_exactly_of_this_hosts_dead_writers_are_leftovers(tmp_path):
    """`.NAME.tmp-HOST-PID` is judged by its pid only when HOST is this host (another node's pid means nothing
    here, whatever that node is called: a name without a dash as much as `node-7`), and only a name that is exactly
    a staging name: `.out.tmp-PID.keep` or `.out.tmp-PIDx` is someone else's file, not out's leftover."""
    import socket
    import subprocess

    from nanotronix.data import files

    dead = subprocess.Popen(["true"])  # its process id names no process once it has ended
    dead.wait()
    host = socket.gethostname()
    ours = [f".out.tmp-{host}-{dead.pid}"]
    theirs = [f".out.tmp-othernode-{dead.pid}", f".out.tmp-{host}-{dead.pid}.keep", f".out.tmp-{dead.pid}x"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x\n")
    assert [p.name for p in files.remove_abandoned_temps(tmp_path / "out")] == ours
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def test_removing_the_folders_made_never_removes_what_someone_put_in_them(tmp_path):
    """remove_made_folders is rmdir only: a folder this command made, into which another process wrote a file
    since, is not ours to remove; it stays with the file (and so do the levels above it)."""
    from nanotronix.data import files

    made = files.make_folder_durably(tmp_path / "a" / "b")
    (tmp_path / "a" / "b" / "theirs.txt").write_text("kept\n")
    files.remove_made_folders(made)
    assert (tmp_path / "a" / "b" / "theirs.txt").read_text() == "kept\n"


def test_commit_without_replace_leaves_a_file_that_appeared_meanwhile(tmp_path):
    """commit(replace=False) (a command run without --overwrite whose check that the output was free came minutes
    earlier): an output another command wrote since is a FileExistsError and stays as it is; the staged one does
    not replace it (os.replace alone would, silently)."""
    from nanotronix.data import files

    final, temp = tmp_path / "out.json", tmp_path / ".out.json.tmp"
    final.write_text("theirs\n")
    temp.write_text("ours\n")
    with pytest.raises(FileExistsError):
        files.commit(temp, final, replace=False)
    assert final.read_text() == "theirs\n"


def test_a_failed_rename_of_a_folder_puts_the_older_one_back(tmp_path, monkeypatch):
    """commit of a folder over an older one renames the older aside first; when the new one's rename then fails
    (a full metadata journal, EIO), the older folder goes back under its name: the output is the old whole one,
    never missing."""
    from nanotronix.data import files

    final, temp = tmp_path / "hf", tmp_path / ".hf.tmp"
    final.mkdir()
    (final / "config.json").write_text("old\n")
    temp.mkdir()
    (temp / "config.json").write_text("new\n")
    real = os.replace

    def replace(src, dst):
        if Path(src) == temp:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError):
        files.commit(temp, final)
    assert (final / "config.json").read_text() == "old\n"


def test_an_unwritable_output_folder_leaves_no_folder_made_for_it(tmp_path, monkeypatch):
    """check_writable_folder makes the missing levels, then writes a probe file: when that write fails (a
    read-only or full file system), the error names the option and the levels it made are removed again (a failed
    command leaves no empty folders behind)."""
    import nanotronix.cli
    from nanotronix.cli import check_writable_folder

    def mkstemp(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(nanotronix.cli.tempfile, "mkstemp", mkstemp)
    with pytest.raises(UserError, match=r"^--output: cannot write to .*Permission denied"):
        check_writable_folder(tmp_path / "a" / "b", "--output")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_a_local_rank_past_the_nodes_gpus_is_refused_in_one_line(monkeypatch, requested):
    """More processes on a node than GPUs it shows (`make quickstart`'s 4 ranks on a 1-GPU workstation with
    `auto`): the ranks past the last GPU are refused with one line naming the count and the way out, not
    torch.cuda.set_device's traceback; the ranks that have a GPU get theirs, and `cpu` is never refused."""
    import torch

    from nanotronix.distributed import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    for local_rank in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        assert pick_device(requested) == torch.device("cuda", local_rank)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UserError) as e:
        pick_device(requested)
    assert str(e.value) == (f"train.device: {requested} puts local rank 2 on GPU 2, but this node shows 2 CUDA GPU(s) "
                            "(CUDA_VISIBLE_DEVICES=4,5): start at most 2 process(es) per node, or set train.device=cpu")
    assert pick_device("cpu") == torch.device("cpu")
