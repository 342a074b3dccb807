from nanotronix.parallel.context import ParallelContext

__all__ = ["ParallelContext"]
