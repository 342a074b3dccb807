# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
# Both create .venv (seeing the system's packages, so a cluster's own CUDA torch is kept), install torch only
# when none >= 2.11 (setup.py's floor) is importable: 2.13.0, the CPU build where pip's index offers it, as on the
# CI machines (left to pip, an older torch would be replaced by the newest, a multi-GB CUDA build); then install
# nanotronix editable with what the quickstart and tests use; `make test` adds NVIDIA DALI (~1 GB, for the DALI
# loader's CPU tests). Re-running is fast: the install steps are skipped while setup.py is unchanged.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nanotronix-installed
DALI_STAMP := $(VENV)/.nanotronix-dali-installed
PYTEST_ARGS ?=
# Three pytest-xdist workers, whole files each: one runs the Slurm job files alone (they wait on the cluster's jobs),
# two run the other files, one per core (tests/conftest.py).
PYTEST_WORKERS ?= 3
# A test that hangs (a collective no rank answers, a Slurm job that never starts) fails after 20 minutes with its
# stacks (pytest-timeout; longer than any test's own bound, the quickstart's 15) instead of holding CI to its
# limit; the slowest tests are listed to keep the suite's 20-minute budget in sight.
PYTEST_GUARDS := --timeout 1200 --durations 15

.PHONY: install quickstart test clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -c "import torch, sys; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 11))" 2>/dev/null \
		|| $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --upgrade "setuptools>=70" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	@# A torch kept from outside the venv installs no torchrun script into it: `torchrun` after activating it was the
	@# system's, whose workers run under the system Python (without nanotronix). This one runs the venv's Python.
	[ -x $(VENV)/bin/torchrun ] || { printf '%s\n' '#!/bin/sh' \
		'exec "$$(dirname "$$0")/python" -m torch.distributed.run "$$@"' > $(VENV)/bin/torchrun \
		&& chmod +x $(VENV)/bin/torchrun; }
	touch $(STAMP)

$(DALI_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,dali]"
	touch $(DALI_STAMP)

quickstart: install
	PY=$(PY) bash examples/quickstart.sh

test: install $(DALI_STAMP)
	$(PY) -m pytest tests -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_GUARDS) $(PYTEST_ARGS)

# Not runs/: the Slurm scripts keep their runs (checkpoints) there by default.
clean:
	rm -rf quickstart build *.egg-info
