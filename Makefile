# The two commands: `make demo` (the embedded demo, end to end) and `make test`.
# Each creates the virtualenv first if it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= results/demo_data

.PHONY: demo test install cluster-deps

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: install
	$(PY) jobs/make_demo_data.py --out $(DEMO_DATA)
	$(PY) jobs/launch_grid.py configs/grid/demo.yaml --cluster local

# The Slurm tests need a real local cluster; its packages come from Debian (root needed).
cluster-deps:
	bash slurm/local_cluster/install.sh

test: install cluster-deps
	$(PY) -m pytest
