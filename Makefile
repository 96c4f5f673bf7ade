# Every target bootstraps .venv on first use; nothing here needs root.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: venv bench-venv run test test-all test-faults soak tensorboard bench bench-foundation bench-replay bench-scaling bench-learner bench-loop device-kit experiment-norm experiment-learn screenshot clean up down logs scale rehearse chaos

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
	$(PY) -m pytest -q -rfEs -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -rfEs $(ARGS)

# The fault-injection tests alone (they are part of `make test` too).
test-faults: $(STAMP)
	$(PY) -m pytest -q -s tests/test_faults.py $(ARGS)

# make soak MINUTES=30: the embedded distributed system watched for RSS growth and throughput drift.
MINUTES ?= 30
soak: $(STAMP)
	$(PY) -m tests.bench.soak --minutes $(MINUTES)

tensorboard: $(STAMP)
	@echo "the overview: http://127.0.0.1:6006/#custom_scalars"
	$(VENV)/bin/tensorboard --logdir runs --host 127.0.0.1 --port 6006

clean:
	rm -rf $(VENV) .pytest_cache

BENCH_STAMP := $(VENV)/.installed-bench

# Benchmarks and experiments also need the bench extra (stable-baselines3, matplotlib).
bench-venv: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: bench-foundation bench-replay bench-scaling bench-learner

bench-learner: $(BENCH_STAMP)
	$(PY) -m tests.bench.learner $(ARGS)

# ARGS="--steps N --set key=value ..." scales them (e.g. on a GPU: --set learner.device=cuda --set td3.batch_size=256);
# experiment-learn also takes --arms default,seeds,sb3-cnn,sb3-vector,... --seeds 1,2,3 --scenario 0|1|2.
experiment-norm: $(BENCH_STAMP)
	$(PY) -m tests.bench.experiments norm $(ARGS)

experiment-learn: $(BENCH_STAMP)
	$(PY) -m tests.bench.experiments learn $(ARGS)

# results/overview.png: a short run's overview in headless Chromium (needs a system chromium).
screenshot: $(STAMP)
	$(PY) -m tests.bench.screenshot $(ARGS)

bench-foundation: $(STAMP)
	$(PY) -m tests.bench.foundation

bench-replay: $(STAMP)
	$(PY) -m tests.bench.replay $(ARGS)

bench-scaling: $(STAMP)
	$(PY) -m tests.bench.scaling $(ARGS)

# The learner's loop in a distributed run against bench-learner's rate (not in `make bench`: on a
# CPU its actors share the learner's cores). ARGS="--seconds 120 --actors 4".
bench-loop: $(BENCH_STAMP)
	$(PY) -m tests.bench.loop $(ARGS)

# .whl/: the wheels and slim Ray that deploy/device/check.sh needs on a GPU machine without network.
device-kit: $(BENCH_STAMP)
	$(PY) deploy/device/kit.py

# docker-compose.yml's services as host processes (their real entrypoints and compose's environment,
# CARLA stand-in servers): join, elastic scale up/down, refused workers, SIGINT + resume. No Docker needed.
rehearse: $(STAMP)
	$(PY) -m tests.rehearse $(ARGS)

# Learning under faults (results/chaos.md): an embedded run with a rollout actor SIGKILLed every 2 min
# and Redis SIGKILLed once, against the same run undisturbed; then the CARLA path (the rehearsal's
# topology) with stand-in servers that crash. About 45 min on 2 cores. ARGS="--steps N --only carla".
chaos: $(STAMP)
	$(PY) -m tests.bench.chaos $(ARGS)

# -- the GPU cluster (docker-compose.yml); COMPOSE=docker-compose for Compose v1 ------------------
COMPOSE ?= docker compose
NUM_ACTORS = $(or $(shell sed -n 's/^NUM_ACTORS=//p' .env 2>/dev/null),2)
export HOST_UID := $(shell id -u)
export HOST_GID := $(shell id -g)

.env:
	@echo "no .env: cp .env.example .env and set REDIS_PASSWORD and RAY_AUTH_TOKEN" >&2; exit 1

# One carla-worker per rollout actor, plus one for the evaluator.
up: .env
	mkdir -p runs
	$(COMPOSE) up -d --build --scale carla-worker=$$(( $(NUM_ACTORS) + 1 ))

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs -f --tail=100

# make scale N=<workers>: N carla-workers while training goes on. The CARLA config's elastic actors
# (actors.elastic_resource: carla) follow the workers' slots: N-1 rollout actors plus the evaluator.
# NUM_ACTORS in .env is updated so that the next `make up` starts as many; the learner is not
# recreated (--no-recreate), so it keeps training.
scale: .env
	@test -n "$(N)" && [ "$(N)" -ge 2 ] || { echo "usage: make scale N=<carla workers, >= 2>" >&2; exit 2; }
	sed -i 's/^NUM_ACTORS=.*/NUM_ACTORS=$(shell echo $$(( $(N) - 1 )))/' .env
	grep -q '^NUM_ACTORS=' .env || echo "NUM_ACTORS=$$(( $(N) - 1 ))" >> .env
	$(COMPOSE) up -d --no-recreate --scale carla-worker=$(N)
