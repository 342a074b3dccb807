"""What every command shares at its edges: bad input and unusable paths as one line, and files replaced whole.

`one_line_errors` wraps a command's `main`: a UserError (bad input), an OSError (a path that cannot be read or
written: under a file, a read-only or special file system, a full disk) and Ctrl-C each end the command with one
line instead of a traceback; a closed pipe (`tool | head`) ends it quietly. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable

from nanotronix.errors import UserError, fail

EXIT_INTERRUPTED = 130


def os_error_line(error: OSError) -> str:
    """`Not a directory: /x/y` (what failed, on which path), without Python's `[Errno 20]` and quotes."""
    where = error.filename2 if error.filename2 is not None else error.filename
    what = error.strerror or str(error)
    return f"{what}: {where}" if where is not None else what


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            return fail(e)
        except BrokenPipeError:
            # the reader went away (`| head`): stop quietly, and keep Python's exit-time flush from complaining
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except OSError as e:
            return fail(os_error_line(e))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
    return guarded


def replace_file(path: str | Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Write `path` whole or not at all: `write(temp_path)` creates a hidden file beside it, which then replaces
    `path` (a reader never sees a half-written file); the temp file never stays behind. An unusable path is a
    UserError naming `path`."""
    target = Path(path)
    temp = str(target.parent / f".{target.name}.tmp-{os.getpid()}{suffix}")  # made by `write`: the usual mode
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(temp)
        os.replace(temp, target)
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target


def check_writable_folder(folder: str | Path, option: str) -> None:
    """Create `folder` if it is missing and make sure a file can be written in it, so that an unusable output path
    is one line naming `option` before the work, not an error after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".nanotronix-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except (FileExistsError, NotADirectoryError):  # mkdir's words for a file where a folder was to be
        raise UserError(f"{option}: cannot write to {folder} (a part of that path is a file, not a folder)") from None
    except OSError as e:
        raise UserError(f"{option}: cannot write to {folder} ({e.strerror or e})") from None
