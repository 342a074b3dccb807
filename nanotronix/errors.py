"""Errors caused by the user's input (config, paths, layout). Commands print them as one line and exit 2
(`fail`); anything else is a bug and keeps its traceback."""
import math
import sys
from typing import Callable, Optional

EXIT_BAD_INPUT = 2
PATH_THROUGH_A_FILE = "a part of that path is a file, not a folder"  # what mkdir's FileExistsError means to a user


class UserError(Exception):
    """`every_rank`: every rank of a distributed run raises the same one (a collective step failed as a whole), so
    rank 0 says it for all. `said_elsewhere`: another rank raises this same one and says it (set where that is known,
    e.g. the ranks of one model replica reading one batch), so this rank keeps quiet. `said_for_the_stopped`: the line
    this rank says also says why the ranks it stops (at their next collective) stop, so they keep quiet once it is
    out (nanotronix.distributed.note_cause_said; a bad batch: the other model replicas; an out of memory: the
    others)."""

    def __init__(self, message: object = "", *, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank
        self.said_elsewhere = False
        self.said_for_the_stopped = False


class ConfigError(UserError, ValueError):
    """A config problem, reported to the user as one line naming the field (every rank reads the same config)."""

    def __init__(self, message: object = "", *, every_rank: bool = True):
        super().__init__(message, every_rank=every_rank)


# What str.splitlines() breaks a line at, each written as its escape: a path or value given on the command line can
# hold one ($'a\nb'), and the error line naming it must stay one line.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    """`text` with its line breaks escaped (`\\n`, `\\u2028`, ...): one line whatever a user's input held."""
    return text.translate(_LINE_BREAKS)


def say_line(line: str) -> None:
    """`line` on stderr, as one line (`one_line`), in one write: ranks saying theirs at the same moment into
    torchrun's one pipe would otherwise mix them (unbuffered, as PYTHONUNBUFFERED makes it, print writes the text and
    its newline apart)."""
    sys.stderr.write(f"{one_line(line)}\n")
    sys.stderr.flush()


# The longest integer an error line shows whole (2^128 has 39 digits): a longer one is a typo or an edit (a config's
# vocab_size of 10**400), and its digits would fill the line; so would those of a product of it.
SHOWN_DIGITS = 39


def number_text(value: object, text: Callable[[object], str] = str) -> str:
    """`text(value)`, or for an integer of more than SHOWN_DIGITS digits (str() refuses past 4300 of them: a
    ValueError raised while saying the error) its digit count: `<an integer of 401 digits>`, `<a negative integer
    of 401 digits>`."""
    if not isinstance(value, int) or isinstance(value, bool) or -10 ** SHOWN_DIGITS < value < 10 ** SHOWN_DIGITS:
        return text(value)
    digits = int(math.log10(abs(value))) + 1  # math.log10 takes any int; a float's rounding is fixed below
    digits += (abs(value) >= 10 ** digits) - (abs(value) < 10 ** (digits - 1))
    return f"<{'a negative' if value < 0 else 'an'} integer of {digits} digits>"


def json_kind(value: object) -> str:
    """JSON's name of VALUE's type (null, boolean, a list is an array), for a line saying what was found instead."""
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def fail(message: object) -> int:
    """Say `error: message` on one stderr line; returns the bad-input exit code for the command to exit with."""
    say_line(f"error: {message}")
    return EXIT_BAD_INPUT


def found_behind(error: Optional[BaseException], matches: Callable[[BaseException], bool]) -> Optional[BaseException]:
    """`error` itself or the first exception behind it (its cause or context, and theirs) that `matches`, else None:
    libraries re-raise what went wrong wrapped in their own errors (torch.distributed.pipelining's stages, DCP)."""
    while error is not None and not matches(error):
        error = error.__cause__ or error.__context__
    return error


class StoppedWhenComplete(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (`terminated`) that came once the output at `output` was renamed into place (a store, a
    converted model folder): what it stopped was the cleanup after it, and the output is whole."""

    def __init__(self, output: str, terminated: bool):
        super().__init__(output)
        self.output, self.terminated = output, terminated
