# atropos-megatron: every target creates/refreshes the virtualenv it needs (see tools/bootstrap_venv.sh).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
CHAOS_ARGS ?=
# gpu-check runs on a GPU machine's own python (no venv); its missing wheels, if any, come from .whl/
GPU_PY ?= python3
GPU_CHECK_ARGS ?=
GPU_SITE := $(if $(wildcard .whl/*.whl),/tmp/site:)

.PHONY: help install demo run chaos test test-fast gpu-check lint format protos clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create/refresh .venv (CPU torch 2.13.0 without CUDA; your CUDA torch with it)

$(STAMP): pyproject.toml tools/bootstrap_venv.sh
	VENV=$(VENV) bash tools/bootstrap_venv.sh
	@touch $@

demo: install  ## the one-command demo: a tiny model learns a toy Atropos task on CPU (~1 min; runs/demo)
	$(VENV)/bin/atropos-megatron demo $(DEMO_ARGS)

run: install  ## train on your own environment script, every process on this machine: make run ENV_SCRIPT=my_env.py [RUN_ARGS="--steps 50 -- --env.group_size 8"]
	@test -n "$(ENV_SCRIPT)" || { echo 'usage: make run ENV_SCRIPT=path/to/my_env.py [RUN_ARGS="..."] (see: .venv/bin/atropos-megatron run --help)'; exit 2; }
	$(VENV)/bin/atropos-megatron run $(ENV_SCRIPT) $(RUN_ARGS)

chaos: install  ## the demo's processes killed and restarted for 8 min: 0 batches lost or duplicated? (runs/chaos)
	$(PY) benchmarks/chaos.py $(CHAOS_ARGS)

test: install  ## run every test that can run on this machine (GPU tests skip without CUDA; Slurm is installed if root)
	bash tools/slurm/install_slurm.sh
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install  ## unit tests only: no multi-process or slow tests
	$(PY) -m pytest -m "not distributed and not slow" $(PYTEST_ARGS)

gpu-check:  ## on a CUDA machine, < 8 min: GPU tests + kernel and trainer benchmarks, into benchmarks/RESULTS.md (GPU_CHECK_ARGS="--help")
	$(if $(GPU_SITE),$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl)
	PYTHONPATH=$(GPU_SITE)$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

lint: install  ## ruff check + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install  ## apply ruff formatting and safe fixes
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

protos: install  ## regenerate the gRPC stubs in atropos_megatron/bridge/v1 from protos/
	PY=$(PY) bash tools/gen_protos.sh

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
