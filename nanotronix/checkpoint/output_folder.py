"""The converters' output folder: what they may write to, and what `--overwrite` may replace.

`--overwrite` removes the old folder once the new one is complete, so a careless path must not reach it: an output
that is the input, holds it or lies inside it is refused, and only a folder that is an earlier output of the same
kind (`replaceable`) is replaced; a training run, or anyone's other files, are left alone with one line saying so.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from nanotronix.data.files import note_removed_temps, remove_abandoned_temps, temp_path
from nanotronix.errors import PATH_THROUGH_A_FILE, UserError


def prepare_output(output: Path, source: Path, overwrite: bool, replaceable: Callable[[Path], bool],
                   kind: str) -> Path:
    """The new, empty staging folder beside `output` (data/files' temp name) that `data.files.commit` later puts in
    its place. Raises UserError unless `output` may be written: absent or empty, or (with overwrite) a folder for which
    `replaceable` holds, `kind` naming what that is ("a Hugging Face model folder"); never one that is, holds or lies
    inside `source`; and when its folder cannot be written (the error names the output, not the staging folder)."""
    if output.is_symlink():  # what would be replaced is the link, not the folder it names: say so before the work
        raise UserError(f"--output {output} is a symbolic link; give the folder it points to, or another name")
    out, src, here = output.resolve(), source.resolve(), Path.cwd().resolve()
    if out == src or out in src.parents or src in out.parents:
        raise UserError(f"--output {output}: it is, holds or lies inside the input {source}; choose another folder")
    if out == here or out in here.parents:  # `.`: the finished folder is renamed into place, which cannot be done here
        raise UserError(f"--output {output}: it is or holds the current folder; name a folder (e.g. ../NAME)")
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        if not overwrite:
            raise UserError(f"output {output} already exists (remove it or pass --overwrite)")
        if not output.is_dir() or not replaceable(output):
            raise UserError(f"--overwrite: {output} is not {kind}, so it is left as it is (remove it yourself if "
                            "it is to go)")
    staging = temp_path(output)
    note_removed_temps(remove_abandoned_temps(output))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except (FileExistsError, NotADirectoryError):  # mkdir's words for a file where a folder was to be
        raise UserError(f"--output {output}: cannot write there ({PATH_THROUGH_A_FILE})") from None
    except OSError as e:
        raise UserError(f"--output {output}: cannot write there ({e.strerror or e})") from None
    return staging

