"""nanotronix: Megatron-style 3D-parallel pre-training of SmolLM2-family Llama models."""
import sys

__version__ = "0.1.0"

# `python -m nanotronix.X` (train, evaluate, preflight, launch, rendezvous_store) imports this package before X's
# own imports (torch & co.), with sys.argv[0] still "-m" (Python's documented value while it locates the module): a
# Python that lacks the project's packages (the system python3 instead of .venv/bin/python) then says which in one
# line and exits 2, for every such command from this one place, where each ended in a ModuleNotFoundError traceback.
# An `import nanotronix` (a tool, a test, a library user) is left alone: a tool checks in tools/_project_python.py.
if sys.argv[:1] == ["-m"]:
    from nanotronix.python_check import require_project_packages

    require_project_packages()
