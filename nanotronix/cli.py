"""What every command shares at its edges: bad input and unusable paths as one line, and files replaced whole.

`one_line_errors` wraps a command's `main`: a UserError (bad input), an OSError (a path that cannot be read or
written: under a file, a read-only or special file system, a full disk) and Ctrl-C each end the command with one
line instead of a traceback; a closed pipe (`tool | head`) ends it quietly. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import functools
import os
import select
import sys
import tempfile
from pathlib import Path
from typing import Callable

from nanotronix.data.files import commit, remove_quietly, temp_path
from nanotronix.errors import UserError, fail
from nanotronix.train import EXIT_INTERRUPTED


def finite_float(text: str) -> float:
    """argparse type: a number, not nan or inf (which pass every `<= 0` check and end in a traceback or a nan
    figure)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed: numpy's generators take no negative one)."""
    import argparse

    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return int(text)


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
        except BrokenPipeError as e:
            if not _stdout_is_gone():  # a pipe to a worker or a socket: a real failure
                return fail(os_error_line(e))
            # the reader went away (`| head`): stop quietly, and keep Python's exit-time flush from complaining
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except OSError as e:
            return fail(os_error_line(e))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
    return guarded


def _stdout_is_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file behind stdout, or no poll on this platform
        return False


def replace_file(path: str | Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Write `path` whole or not at all: `write(temp_path)` creates a hidden file beside it, which then replaces
    `path` (a reader never sees a half-written file); the temp file never stays behind. An unusable path is a
    UserError naming `path`."""
    target = Path(path)
    temp = temp_path(target)
    temp = temp.with_name(temp.name + suffix)  # made by `write` (the usual file mode); the suffix for its format
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        write(str(temp))
        commit(temp, target)
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        remove_quietly(temp)
    return target


def check_writable_folder(folder: str | Path, option: str) -> None:
    """Create `folder` if it is missing and make sure a file can be written in it, so that an unusable output path
    is one line naming `option` before the work, not an error after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nanotronix-probe-", dir=folder)  # unique across hosts sharing it
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):  # mkdir's words for a file where a folder was to be
        raise UserError(f"{option}: cannot write to {folder} (a part of that path is a file, not a folder)") from None
    except OSError as e:
        raise UserError(f"{option}: cannot write to {folder} ({e.strerror or e})") from None
