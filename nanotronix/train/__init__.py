"""Training loop package; `python -m nanotronix.train` runs it."""

# Exit code of a run stopped by SIGTERM/SIGUSR1 after it saved a checkpoint (sysexits EX_TEMPFAIL: requeue me).
EXIT_PREEMPTED = 75

# Exit code of a run stopped by Ctrl-C (SIGINT): the shells' 128 + 2.
EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Ctrl-C: the run stops where it is, without saving (every rank of a terminal's job gets it; rank 0 says it)."""
