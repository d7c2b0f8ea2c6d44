# The two commands: `make demo` (the embedded demo, end to end) and `make test`.
# Each creates the virtualenv first if it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= results/demo_data

.PHONY: demo test install cluster-deps bench

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

# Benchmarks, each printing a table (about 12 min on a 2-core CPU). Benchmark 4 runs the demo
# grid with a 50-step schedule here; `benchmarks/demo_grid.py --steps 1500` is the full one.
bench: install
	$(PY) benchmarks/packing.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/demo_grid.py --steps 50
	$(PY) benchmarks/feature_cache.py --steps 300
	$(PY) benchmarks/full_size.py --tiny
	$(PY) benchmarks/encoders.py --tiny
	$(PY) benchmarks/plan_scale.py
