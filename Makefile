# lexp — common tasks. `make install && make test` on a fresh machine.
#
# The environment lexp runs in: the active virtualenv (or conda environment) when there is one, else
# .venv in this checkout, which `make install` creates with $(VENV_PYTHON). A stock Debian or Ubuntu
# python3 is "externally managed" (PEP 668): pip refuses to install into it, so nothing here ever
# does (no --break-system-packages). `make test`, `make run`, `make sweep`... use the same
# environment; `. .venv/bin/activate` gives it to your shell.
VENV_PYTHON ?= python3
ACTIVE_ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX))
VENV := $(CURDIR)/.venv
PYTHON ?= $(if $(ACTIVE_ENV),$(ACTIVE_ENV)/bin/python,$(VENV)/bin/python)
TORCH ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/data)
export LEXP_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install venv env test run sweep sweep-parallel preset paper bench bench-neurox lint format clean

install: venv  ## CPU torch first (never the multi-GB CUDA wheels), then lexp with dev tools
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[dev]"
	@echo "lexp is installed in $$($(PYTHON) -c 'import sys; print(sys.prefix)'): make test, make run ARGS=..., or activate it (. <that folder>/bin/activate)"

ifeq ($(PYTHON),$(VENV)/bin/python)
venv: $(VENV)/bin/python  ## .venv in the checkout (not when a virtualenv is active or PYTHON names another interpreter)
$(VENV)/bin/python:
	$(VENV_PYTHON) -m venv "$(VENV)" || { rm -rf "$(VENV)"; \
	  echo "make: could not create $(VENV) with $(VENV_PYTHON); on Debian/Ubuntu: sudo apt-get install python3-venv"; exit 1; }
else
venv: ;
endif

env:  # every target that runs lexp: a clear line when `make install` has not run yet
	@command -v "$(PYTHON)" >/dev/null 2>&1 || { echo "make: $(PYTHON) not found: run \`make install\` first"; exit 1; }

test: env  ## the test suite (offline; fails when no test ran); some files: make test ARGS="tests/test_config.py -x"
	WANDB_MODE=disabled $(PYTHON) -m pytest -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

run: env  ## one task end to end with the default offline model
	$(PYTHON) -m lexp.run task=pos $(ARGS)

sweep: env  ## the four sequence-labelling tasks as a Hydra multirun into multirun/
	$(PYTHON) -m lexp.run -m task=pos,sem,ccg,chunking

JOBS ?= 2
sweep-parallel: env  ## the same sweep, JOBS jobs at a time (Hydra's joblib launcher)
	$(PYTHON) -m lexp.run -m task=pos,sem,ccg,chunking hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS)

PRESET ?= table6
LAUNCHER ?= basic
preset: env  ## one paper preset (conf/experiment/): make preset PRESET=table7 LAUNCHER=joblib; then python -m lexp.tables multirun/<date>/<time>_<preset> --paper
	$(PYTHON) -m lexp.run -m +experiment=$(PRESET) hydra/launcher=$(LAUNCHER)

paper: env  ## every table of the paper this machine's data allows (44 jobs, JOBS at a time; hours on a CPU)
	$(PYTHON) -m lexp.run -m +experiment=paper hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS)

bench-neurox:  ## the peer's separate environment (.venv-neurox)
	bash benchmarks/setup_neurox.sh .venv-neurox

bench: env bench-neurox  ## benchmarks against NeuroX 1.0.9 in the same run; figures on stdout and in bench_results/
	$(PYTHON) benchmarks/bench_extraction.py
	$(PYTHON) benchmarks/bench_probes.py
	$(PYTHON) benchmarks/bench_clustering.py
	$(PYTHON) benchmarks/bench_rss.py

lint: env
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

format: env
	$(PYTHON) -m ruff check --fix src tests benchmarks
	$(PYTHON) -m ruff format src tests benchmarks

clean:  ## caches and run outputs (not the datasets)
	rm -rf .cache outputs multirun bench_results .pytest_cache .ruff_cache
