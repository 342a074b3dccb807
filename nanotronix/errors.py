"""Errors caused by the user's input (config, paths, layout). Commands print them as one line and exit 2
(`fail`); anything else is a bug and keeps its traceback."""
import sys

EXIT_BAD_INPUT = 2


class UserError(Exception):
    pass


class ConfigError(UserError, ValueError):
    """A config problem, reported to the user as one line naming the field."""


def fail(message: object) -> int:
    """Say `error: message` on one stderr line; returns the bad-input exit code for the command to exit with."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT
