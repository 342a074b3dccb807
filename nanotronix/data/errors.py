"""The one exception type of the data package.

Every user-facing problem (missing store, damaged file, bad record, unknown tokenizer) is raised as a
`DataError` whose message is one line that names the path or record, so a command can print it and exit
non-zero without a traceback. It is a `nanotronix.errors.UserError`, which the trainer's commands catch.
"""
from nanotronix.errors import UserError


class DataError(UserError, ValueError):
    """A data problem, reported to the user as one line."""


def require_module(name: str, feature: str):
    """Import an optional dependency, or raise one clear line saying how to install it."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f"{feature} needs the Python package {name!r}: pip install 'nanotronix[data]'") from None
