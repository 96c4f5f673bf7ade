# Every target bootstraps .venv on first use; nothing here needs root.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: venv run test test-all tensorboard bench bench-foundation bench-replay bench-scaling clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m learner $(ARGS)

# pytest exits 5 when it collects no test; that is a failure here, as any non-zero code is.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs --host 127.0.0.1 --port 6006

clean:
	rm -rf $(VENV) .pytest_cache

bench: bench-foundation bench-replay bench-scaling

bench-foundation: $(STAMP)
	$(PY) -m tests.bench.foundation

bench-replay: $(STAMP)
	$(PY) -m tests.bench.replay

bench-scaling: $(STAMP)
	$(PY) -m tests.bench.scaling
