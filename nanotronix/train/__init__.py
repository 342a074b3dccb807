"""Training loop package; `python -m nanotronix.train` runs it."""

# Exit code of a run stopped by SIGTERM/SIGUSR1 after it saved a checkpoint (sysexits EX_TEMPFAIL: requeue me).
EXIT_PREEMPTED = 75
