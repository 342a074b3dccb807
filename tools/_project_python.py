"""Imported by every tool before its nanotronix imports (`import _project_python`): a tool run with a Python that
lacks the project's packages (the system python3 instead of .venv/bin/python) says so in one line and exits 2
(nanotronix/python_check.py), where it ended in a ModuleNotFoundError traceback. The checkout goes at the end of
sys.path so that nanotronix, and that check, are found even where nanotronix is not installed into this Python; one
installed there (make install's editable one) is still the one imported."""
import sys
from pathlib import Path

CHECKOUT = str(Path(__file__).resolve().parents[1])
if CHECKOUT not in sys.path:
    sys.path.append(CHECKOUT)

from nanotronix.python_check import require_project_packages  # noqa: E402

require_project_packages()
