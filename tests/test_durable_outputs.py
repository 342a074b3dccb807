"""What a command reports as written survives a power loss: every file of an output is fsynced before the rename
that publishes it, the folder holding it is fsynced after that rename (a rename is durable only then), and the
folders an output path made (`mkdir -p`) have their entries fsynced in their parents (nanotronix/data/files.py).
A power loss cannot be staged here, so the tests record the order of the file system calls that POSIX makes the
guarantee depend on (fsync, rename)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import load_tool, record_file_system_calls

from nanotronix.data import files


@pytest.fixture()
def calls(monkeypatch) -> list[tuple[str, ...]]:
    """The file system calls from the test's start on (helpers.record_file_system_calls)."""
    return record_file_system_calls(monkeypatch)


def assert_published_durably(events: list, final: Path) -> None:
    """`final` (a file or a folder) reached its name by a rename after each of its files and folders was fsynced
    under its temp name, and the folder holding it was fsynced after that rename."""
    renamed = max(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    temp = Path(events[renamed][1])
    inside = [final, *final.rglob("*")] if final.is_dir() else [final]
    synced_before = {Path(e[1]) for e in events[:renamed] if e[0] == "fsync"}
    unsynced = [p for p in inside if temp / p.relative_to(final) not in synced_before]
    assert not unsynced, (unsynced, events)
    assert ("fsync", str(final.parent)) in events[renamed + 1:], events


def test_commit_makes_a_folder_and_its_rename_durable(tmp_path, calls):
    temp = tmp_path / ".model.tmp"
    (temp / "sub").mkdir(parents=True)
    for name in ("config.json", "sub/weights.bin"):
        (temp / name).write_text(name)
    files.commit(temp, tmp_path / "model")
    assert_published_durably(calls, tmp_path / "model")


@pytest.mark.parametrize("fmt, published", [("megatron", ["out.bin", "out.meta.json", "out.idx"]),
                                              ("zarr", ["out.zarr"])])
def test_preprocess_publishes_its_store_durably(tmp_path, tiny_tokenizer, calls, fmt, published):
    """Into an output prefix with new folders above it: each new level's entry fsynced in its parent, each file
    of the store fsynced before its rename into place, and the store's folder after it (megatron: .idx, the
    completion marker, renamed last)."""
    tool = load_tool("preprocess")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} of a few words"}) + "\n" for i in range(50)))
    out = tmp_path / "new" / "levels" / "out"
    assert tool.main(["--input", str(src), "--tokenizer", tiny_tokenizer, "--no-progress", "--format", fmt,
                      "--output-prefix", str(out)]) == 0
    synced = {Path(e[1]) for e in calls if e[0] == "fsync"}
    assert {tmp_path, tmp_path / "new", tmp_path / "new" / "levels"} <= synced, synced
    for name in published:
        assert_published_durably(calls, out.parent / name)
    renames = [Path(e[2]).name for e in calls if e[0] == "replace" and Path(e[2]).parent == out.parent]
    assert renames[-1] == published[-1], renames


@pytest.fixture()
def no_folder_fsync(monkeypatch):
    """A file system whose folders cannot be fsynced: Linux's fsync says EINVAL where the file system has no fsync
    for them (SMB/CIFS mounts before Linux 4.17, some FUSE and Ceph ones)."""
    import errno
    import stat

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_folder_that_cannot_be_fsynced_leaves_the_output_to_the_file_system(tmp_path, no_folder_fsync):
    """A folder output (a zarr store, an exported model) and a checkpoint step are still published there, their files
    fsynced (before: the folder's EINVAL failed the command after all its work, where it had not fsynced folders)."""
    from nanotronix.checkpoint import paths

    temp = tmp_path / ".model.tmp"
    (temp / "sub").mkdir(parents=True)
    (temp / "sub" / "weights.bin").write_text("w")
    files.commit(temp, tmp_path / "model")
    assert (tmp_path / "model" / "sub" / "weights.bin").read_text() == "w"
    (tmp_path / "run" / ".step_0000001.tmp").mkdir(parents=True)
    assert paths.commit_step(tmp_path / "run" / ".step_0000001.tmp", tmp_path / "run", 1).is_dir()
    assert (tmp_path / "run" / "latest").read_text() == "step_0000001\n"


def test_a_file_that_fails_its_fsync_still_fails_the_commit(tmp_path, monkeypatch):
    """Only a folder's EINVAL is the file system's business: a file's failed fsync (a lost write: EIO) fails the
    output, which is then not published."""
    import errno

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    temp = tmp_path / ".model.tmp"
    temp.mkdir()
    (temp / "weights.bin").write_text("w")
    with pytest.raises(OSError, match="Input/output error"):
        files.commit(temp, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_lost_write_on_the_folder_holding_the_output_fails_the_commit(tmp_path, monkeypatch):
    """The folder's fsync after the rename saying EIO (a lost write) fails the commit as a file's does: the rename is
    not known to survive a power loss. Only a folder this user cannot open (a parent of mode 711: EACCES, simulated
    since the tests may run as root) is left to the file system's own commit."""
    import errno
    import stat

    real_fsync, real_open = os.fsync, os.open

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    temp = tmp_path / ".out.json.tmp"
    temp.write_text("{}")
    with pytest.raises(OSError, match="Input/output error"):
        files.commit(temp, tmp_path / "out.json")

    def open_(path, flags, *args, **kwargs):
        if Path(path) == tmp_path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    temp.write_text("{}")
    files.commit(temp, tmp_path / "out.json")
    assert (tmp_path / "out.json").read_text() == "{}"


def test_make_folder_durably_is_mkdir_p_and_says_the_levels_it_made(tmp_path):
    """Like `mkdir -p` (os.makedirs, the reference): an existing folder makes nothing, a file where the folder is
    raises FileExistsError as os.makedirs(exist_ok=True) does (it returned as if the folder were there), and the new
    levels come back deepest first, for a failed command to remove."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError) as reference:
        os.makedirs(tmp_path / "file", exist_ok=True)
    with pytest.raises(FileExistsError) as ours:
        files.make_folder_durably(tmp_path / "file")
    assert ours.value.errno == reference.value.errno
    assert files.make_folder_durably(tmp_path) == []
    assert files.make_folder_durably(tmp_path / "a" / "b") == [tmp_path / "a" / "b", tmp_path / "a"]
    assert (tmp_path / "a" / "b").is_dir()


def test_only_a_temp_name_of_ascii_digits_is_a_killed_writers_leftover(tmp_path):
    """remove_abandoned_temps deletes `.NAME.tmp-PID` when no process PID runs; the writers name it with os.getpid()
    (ASCII digits). Its pattern was `\\d`, which takes any script's decimal digits, and int() reads them: a file named
    with the pid in Arabic-Indic digits, which no writer made, was deleted as that process's leftover."""
    import subprocess

    dead = subprocess.Popen(["true"])  # its process id names no process once it has ended
    dead.wait()
    arabic = str(dead.pid).translate({ord(d): chr(0x0660 + int(d)) for d in "0123456789"})
    for pid in (str(dead.pid), arabic):
        (tmp_path / f".out.tmp-{pid}").write_text("x\n")
    assert files.remove_abandoned_temps(tmp_path / "out") == [tmp_path / f".out.tmp-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{arabic}"]


def test_a_writer_removes_only_its_own_outputs_leftovers_of_processes_gone_from_this_host(tmp_path):
    """On a file system shared by many nodes, a staging file named for another output (`.out.v2.tmp-PID`: the output
    `out.v2`, whose name extends `out` with a dot) or written on another host (its pid names no process here, but may
    be running there) is not `out`'s leftover: it was deleted, and that writer failed at its final rename. Staging
    names carry the host (`.NAME.tmp-HOST-PID`); those of older versions (`.NAME.tmp-PID`) are still removed."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])  # its process id names no process once it has ended
    dead.wait()
    host = socket.gethostname()
    assert files.temp_path(tmp_path / "out").name == f".out.tmp-{host}-{os.getpid()}"
    ours = [f".out.tmp-{dead.pid}", f".out.tmp-{host}-{dead.pid}", f".out.replaced.tmp-{host}-{dead.pid}"]
    theirs = [f".out.v2.tmp-{dead.pid}", f".out.v2.tmp-{host}-{dead.pid}", f".out.tmp-other-node-7-{dead.pid}",
              f".out.tmp-{host}-{os.getpid()}"]  # the last: this live process's
    for name in ours + theirs:
        (tmp_path / name).write_text("x\n")
    removed = files.remove_abandoned_temps(tmp_path / "out", tmp_path / "out.replaced")
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def test_replace_file_removes_what_a_killed_writer_of_the_same_output_left(tmp_path, capsys):
    """plot_run --output and train_tokenizer --output write through replace_file, whose staging file
    (`.NAME.tmp-HOST-PID` plus the format's extension) a SIGKILLed run leaves behind, as large as the output: the
    next write of that output removes it when its process is gone, and leaves a live process's and another output's."""
    import socket
    import subprocess

    from nanotronix.cli import replace_file

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    left = [f".plot.png.tmp-{host}-{dead.pid}.png", f".plot.png.tmp-{dead.pid}.png"]
    kept = [f".plot.png.tmp-{host}-{os.getppid()}.png", f".plot.png.tmp-{host}-{dead.pid}",
            f".plot.png.v2.tmp-{host}-{dead.pid}.png"]
    for name in left + kept:
        (tmp_path / name).write_text("x\n")
    replace_file(tmp_path / "plot.png", lambda temp: Path(temp).write_text("png\n"), suffix=".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["plot.png"])
    assert "note: removed what an interrupted run left beside the output" in capsys.readouterr().err
