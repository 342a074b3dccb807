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

from helpers import load_tool

from nanotronix.data import files


@pytest.fixture()
def calls(monkeypatch) -> list[tuple[str, Path, ...]]:
    """("fsync", path as the descriptor names it) and ("replace", src, dst), in the order they happen."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", Path(src), Path(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def assert_published_durably(events: list, final: Path) -> None:
    """`final` (a file or a folder) reached its name by a rename after each of its files and folders was fsynced
    under its temp name, and the folder holding it was fsynced after that rename."""
    renamed = max(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
    temp = events[renamed][1]
    inside = [final, *final.rglob("*")] if final.is_dir() else [final]
    synced_before = {e[1] for e in events[:renamed] if e[0] == "fsync"}
    unsynced = [p for p in inside if temp / p.relative_to(final) not in synced_before]
    assert not unsynced, (unsynced, events)
    assert ("fsync", final.parent) in events[renamed + 1:], events


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
    synced = {e[1] for e in calls if e[0] == "fsync"}
    assert {tmp_path, tmp_path / "new", tmp_path / "new" / "levels"} <= synced, synced
    for name in published:
        assert_published_durably(calls, out.parent / name)
    renames = [e[2].name for e in calls if e[0] == "replace" and e[2].parent == out.parent]
    assert renames[-1] == published[-1], renames
