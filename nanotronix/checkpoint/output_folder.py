"""The converters' output folder: what they may write to, and what `--overwrite` may replace.

`--overwrite` removes the old folder once the new one is complete, so a careless path must not reach it: an output
that is the input, holds it or lies inside it is refused, and only a folder that is an earlier output of the same
kind (`replaceable`) is replaced; a training run, or anyone's other files, are left alone with one line saying so.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from nanotronix.data.files import (commit, file_identity, make_folder_durably, note_removed_temps,
                                   remove_abandoned_temps, remove_made_folders, replaced_path, temp_path)
from nanotronix.errors import PATH_THROUGH_A_FILE, StoppedWhenComplete, UserError


@contextmanager
def staged_output(output: Path, source: Path, overwrite: bool, replaceable: Callable[[Path], bool],
                  kind: str) -> Iterator[Path]:
    """Yields the new, empty staging folder beside `output` (data/files' temp name), which the body fills; once it
    has, the folder is put in `output`'s place (`data.files.commit`), what is there checked again first. Raises
    UserError unless `output` may be written: absent or empty, or (with overwrite) a folder for which `replaceable`
    holds, `kind` naming what that is ("a Hugging Face model folder"); never one that is, holds or lies inside
    `source`; and when its folder cannot be written (the error names the output, not the staging folder). When the
    body fails, the staging folder goes, and so do the folders above `output` made for it (rmdir only): a failed
    conversion leaves nothing behind."""
    _check_output(output, source, overwrite, replaceable, kind)
    staging = temp_path(output)
    note_removed_temps(remove_abandoned_temps(output, replaced_path(output)))  # what commit() stages: both
    made: list[Path] = []
    try:
        made = make_folder_durably(output.parent)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except (FileExistsError, NotADirectoryError):  # mkdir's words for a file where a folder was to be
        remove_made_folders(made)
        raise UserError(f"--output {output}: cannot write there ({PATH_THROUGH_A_FILE})") from None
    except OSError as e:
        remove_made_folders(made)
        raise UserError(f"--output {output}: cannot write there ({e.strerror or e})") from None
    staged = file_identity(staging)
    try:
        yield staging
        # checked again: the conversion took minutes, and a run may have started in `output` meanwhile (an import's
        # folder is a checkpoint.dir), or another conversion finished there first
        _check_output(output, source, overwrite, replaceable, kind)
        try:
            commit(staging, output, replace=overwrite)
        except FileExistsError:
            raise UserError(f"output {output} appeared while converting (another process writing there?): left as "
                            "it is; nothing written") from None
    except BaseException as stop:
        if isinstance(stop, KeyboardInterrupt) and not staging.exists() and file_identity(output) == staged:
            # stopped once the body's commit renamed it into place (while its folder was fsynced): it is whole
            from nanotronix.cli import Terminated
            raise StoppedWhenComplete(str(output), isinstance(stop, Terminated)) from None
        shutil.rmtree(staging, ignore_errors=True)
        remove_made_folders(made)
        raise


def _check_output(output: Path, source: Path, overwrite: bool, replaceable: Callable[[Path], bool],
                  kind: str) -> None:
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

