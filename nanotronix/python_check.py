"""Whether this Python has the packages nanotronix needs (setup.py's install_requires), checked before a command
imports them: a tool or a `python -m nanotronix.*` command run with a Python that lacks them (the system python3
instead of .venv/bin/python, the commonest newcomer mistake) says so in one line instead of ending in a
ModuleNotFoundError traceback; so does a file that hides one of them (a `torch.py` in the folder a `python -m` command
runs from). Standard library only, as it runs before any of them is imported
(tools/_project_python.py for the tools, nanotronix/__init__.py for the `python -m` commands)."""
from __future__ import annotations

import importlib.util
import sys

from nanotronix.errors import fail

# What each command needs to start, by import name -> the name pip installs it by (setup.py's install_requires,
# in its order; tests/test_cli_paths.py holds them to it).
REQUIRED_PACKAGES = {"torch": "torch", "numpy": "numpy", "yaml": "pyyaml", "tokenizers": "tokenizers",
                     "safetensors": "safetensors", "huggingface_hub": "huggingface_hub", "tqdm": "tqdm"}


def missing_packages() -> list[str]:
    """The required packages this Python cannot import, by their pip names (found, not imported: it costs no
    import time)."""
    return [pip_name for name, pip_name in REQUIRED_PACKAGES.items() if not _installed(name)]


def _installed(name: str) -> bool:
    """Whether `name` is a package with code, not only a folder of that name on sys.path (a `torch/` or `yaml/` in the
    folder a `python -m` command runs from), which Python finds as a namespace package (origin None) where nothing
    else of the name is installed: the command would pass this check and end in a traceback at its first use. Each
    required package is a regular one (an __init__.py)."""
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None


def shadowing_files() -> list[tuple[str, str]]:
    """(file, package) for each required package that Python would import from a single module file instead: a user's
    `torch.py` in the folder a `python -m` command runs from (first on sys.path) hides the installed torch, and the
    command would run that file and end in a traceback at its first `import torch.distributed`. Each required package
    is a regular one, never a single module, so such a file is never the real package."""
    specs = {name: importlib.util.find_spec(name) for name in REQUIRED_PACKAGES}
    return [(spec.origin, name) for name, spec in specs.items()
            if spec is not None and spec.origin is not None and spec.submodule_search_locations is None]


def require_project_packages() -> None:
    """Exit 2 with one `error:` line naming a file that hides a required package, or else what this Python lacks and
    how to get it, if either."""
    shadowing = shadowing_files()
    if shadowing:
        where, name = shadowing[0]
        sys.exit(fail(f"{where} shadows the `{name}` package nanotronix needs (Python finds it first, in the folder "
                      "the command runs from or on PYTHONPATH): rename it"))
    missing = missing_packages()
    if missing:
        names = ", ".join(f"`{name}`" for name in missing)
        sys.exit(fail(f"the Python at {sys.executable} lacks {names}: run `make install` and use .venv/bin/python "
                      "(or `source .venv/bin/activate` first)"))
