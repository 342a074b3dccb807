"""Checkpoint problems the user can act on (missing, incomplete, damaged, incompatible): one line each."""
from nanotronix.errors import UserError


class CheckpointError(UserError):
    pass


def unreadable(path, error: OSError) -> CheckpointError:
    """A checkpoint file the disk or the permissions failed to give (not its content: not "damaged"), said as
    `cannot read PATH: [Errno 5] Input/output error`."""
    what = f"[Errno {error.errno}] {error.strerror}" if error.errno is not None else str(error)
    return CheckpointError(f"cannot read {path}: {what}")
