"""Checkpoint problems the user can act on (missing, incomplete, damaged, incompatible): one line each."""
from nanotronix.errors import UserError


class CheckpointError(UserError):
    pass
