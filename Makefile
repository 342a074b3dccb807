# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
# Both create .venv (seeing the system's packages, so a cluster's own CUDA torch is kept), install torch only
# when none is importable (the CPU build 2.13.0: an unpinned torch would pull a multi-GB CUDA build), then
# install nanotronix editable. Re-running is fast: the install step is skipped while setup.py is unchanged.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nanotronix-installed
PYTEST_ARGS ?=

.PHONY: install quickstart test clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --upgrade "setuptools>=70" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,dali]"
	touch $(STAMP)

quickstart: install
	PY=$(PY) bash examples/quickstart.sh

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf quickstart runs build *.egg-info
