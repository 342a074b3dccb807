"""Atomic output: every file a command writes first lives under a temporary name beside its final one and is
renamed into place only once complete and flushed, so an interrupted run never leaves an output that looks
finished. Readers look for the file renamed last (e.g. a Megatron `.idx`), which is the completion marker."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def temp_path(final: str | os.PathLike) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(temp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Flush `temp` to disk and rename it to `final` (replacing an older file or folder of that name)."""
    temp, final = Path(temp), Path(final)
    if temp.is_file():
        fsync_file(temp)
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(temp, final)


def remove_quietly(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    temp = temp_path(path)
    temp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    commit(temp, path)
