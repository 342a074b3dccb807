"""What every command shares at its edges: bad input and unusable paths as one line, and files replaced whole.

`one_line_errors` wraps a command's `main`: a UserError (bad input), an OSError (a path that cannot be read or
written: under a file, a read-only or special file system, a full disk), Ctrl-C and SIGTERM each end the command
with one line instead of a traceback; a closed pipe (`tool | head`) ends it quietly. Anything else is a bug and
keeps its traceback. SIGTERM (kill, timeout, scancel, a Slurm time limit) is raised as `Terminated`, a
KeyboardInterrupt, so that whatever a command cleans up on Ctrl-C (a half-written output) it cleans up on it too;
by default it would end the process on the spot.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import select
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from nanotronix.data.files import (commit, file_identity, make_folder_durably, note_removed_temps,
                                   remove_abandoned_temps, remove_made_folders, remove_quietly, temp_path)
from nanotronix.errors import EXIT_BAD_INPUT, PATH_THROUGH_A_FILE, StoppedWhenComplete, UserError, fail, one_line
from nanotronix.train import EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that bad arguments are one `error:` line (exit 2) as every other bad input is, not
    the usage text and the program's name before the message (`--help` shows the usage)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {one_line(message)}\n")


def integer(text: str) -> int:
    """argparse type: int() of ASCII text, what `type=int` is for every flag here: int() alone also reads other
    scripts' decimal digits ("\u0663" is 3, "\uff13" too) as the number they stand for."""
    try:
        if not text.isascii():
            raise ValueError
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None  # argparse's words for type=int


def finite_float(text: str) -> float:
    """argparse type: a number in ASCII text (float(), like int(), reads other scripts' digits), not nan or inf
    (which pass every `<= 0` check and end in a traceback or a nan figure)."""
    import math

    try:
        if not text.isascii():
            raise ValueError
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def user_path(text: str) -> str:
    """argparse type of every path argument: `~` expanded. A shell expands it in a word of its own, but not after
    `--output=` nor inside quotes, and an unexpanded `--output=~/hf` made a folder named `~` in the working folder
    (which `rm -rf ~` would then "clean up") while the tool reported writing to `~/hf`."""
    return os.path.expanduser(text)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed: numpy's generators take no negative one)."""
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
    return int(text)


def os_error_line(error: OSError) -> str:
    """`Not a directory: /x/y` (what failed, on which path), without Python's `[Errno 20]` and quotes."""
    where = error.filename2 if error.filename2 is not None else error.filename
    what = error.strerror or str(error)
    return f"{what}: {where}" if where is not None else what


EXIT_TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a process that SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be (see the module docstring)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _catch_sigterm():
    """Install SIGTERM -> Terminated where it can be (the main thread) and nobody else handles it; the handler to
    put back, or None."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        previous = _catch_sigterm()
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
        except StoppedWhenComplete as e:  # after the output's last rename: only the cleanup after it was stopped
            print(f"{'terminated' if e.terminated else 'interrupted'} once the output was complete: {e.output} is "
                  "written whole", file=sys.stderr, flush=True)
            return EXIT_TERMINATED if e.terminated else EXIT_INTERRUPTED
        except Terminated:
            print("terminated", file=sys.stderr, flush=True)
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
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
    `path` (a reader never sees a half-written file); the temp file never stays behind, nor the folders made for it
    when the write fails (those it makes are durable, as the file is). A device or FIFO at `path` (`/dev/null`,
    `/dev/stdout`) is written into, as a shell's `>` would: a rename would replace the device node itself. The
    hidden file a SIGKILLed earlier writer of `path` left is removed first. An unusable path is a UserError naming
    `path`."""
    target = Path(path)
    temp = temp_path(target)
    temp = temp.with_name(temp.name + suffix)  # made by `write` (the usual file mode); the suffix for its format
    made: list[Path] = []
    written = None  # the staged file's identity, once `write` made it
    try:
        try:
            made = make_folder_durably(target.parent)
        except (FileExistsError, NotADirectoryError):  # mkdir's words for a file where a folder was to be
            raise UserError(f"cannot write {target} ({PATH_THROUGH_A_FILE})") from None
        if target.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        if target.exists() and not target.is_file():  # (through a link too: /dev/stdout -> /proc/self/fd/1)
            write(str(target))
            return target
        note_removed_temps(remove_abandoned_temps(target, suffix=suffix))  # a SIGKILLed writer's, as large as this
        write(str(temp))
        written = file_identity(temp)
        commit(temp, target)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and written is not None and file_identity(target) == written:
            raise StoppedWhenComplete(str(target), isinstance(e, Terminated)) from None  # stopped after the rename
        remove_quietly(temp)  # first: it lies in the folders made
        remove_made_folders(made)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {target}: {e.strerror or e}") from None
        raise
    return target


def write_json_report(path: str | Path, payload: dict) -> Path:
    """A tool's --json report, replaced whole (`replace_file`): a reader never sees a half-written one."""
    def write(temp: str) -> None:
        with open(temp, "w") as f:
            json.dump(payload, f, indent=2)
    return replace_file(path, write)


def check_writable_folder(folder: str | Path, option: str, keep: bool = True) -> list[Path]:
    """Create `folder` if it is missing and make sure a file can be written in it, so that an unusable output path
    is one line naming `option` before the work, not an error after it. Returns the folders it made, deepest first,
    for a caller whose work may still fail to remove again (`remove_made_folders`: a failed command leaves no empty
    folders behind); a failure here removes them itself. keep=False removes them at once (a check made long before
    the work, by the launch preflight: a run that fails before it starts then leaves no empty folders behind)."""
    folder = Path(folder)
    made: list[Path] = []
    try:
        made = make_folder_durably(folder)
        fd, probe = tempfile.mkstemp(prefix=".nanotronix-probe-", dir=folder)  # unique across hosts sharing it
        os.close(fd)
        os.unlink(probe)
    except BaseException as e:
        remove_made_folders(made)
        if isinstance(e, (FileExistsError, NotADirectoryError)):  # mkdir's words for a file where a folder was to be
            raise UserError(f"{option}: cannot write to {folder} ({PATH_THROUGH_A_FILE})") from None
        if isinstance(e, OSError):
            raise UserError(f"{option}: cannot write to {folder} ({e.strerror or e})") from None
        raise
    if not keep:
        remove_made_folders(made)
        return []
    return made
