# lexp — common tasks. `make install && make test` on a fresh machine.
PYTHON ?= python3
SHARED_DATA := $(abspath ../shared/data)
export LEXP_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install test run sweep sweep-parallel preset paper bench bench-neurox lint format clean

install:  ## CPU torch first (never the multi-GB CUDA wheels), then lexp with dev tools
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## the test suite (offline; fails when no test ran)
	WANDB_MODE=disabled $(PYTHON) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

run:  ## one task end to end with the default offline model
	$(PYTHON) -m lexp.run task=pos

sweep:  ## the four sequence-labelling tasks as a Hydra multirun into multirun/
	$(PYTHON) -m lexp.run -m task=pos,sem,ccg,chunking

JOBS ?= 2
sweep-parallel:  ## the same sweep, JOBS jobs at a time (Hydra's joblib launcher)
	$(PYTHON) -m lexp.run -m task=pos,sem,ccg,chunking hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS)

PRESET ?= table6
LAUNCHER ?= basic
preset:  ## one paper preset (conf/experiment/): make preset PRESET=table7 LAUNCHER=joblib; then python -m lexp.tables multirun/<date>/<time>_<preset> --paper
	$(PYTHON) -m lexp.run -m +experiment=$(PRESET) hydra/launcher=$(LAUNCHER)

paper:  ## every table of the paper this machine's data allows (44 jobs, JOBS at a time; hours on a CPU)
	$(PYTHON) -m lexp.run -m +experiment=paper hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS)

bench-neurox:  ## the peer's separate environment (.venv-neurox)
	bash benchmarks/setup_neurox.sh .venv-neurox

bench: bench-neurox  ## benchmarks against NeuroX 1.0.9 in the same run; figures on stdout and in bench_results/
	$(PYTHON) benchmarks/bench_extraction.py
	$(PYTHON) benchmarks/bench_probes.py
	$(PYTHON) benchmarks/bench_clustering.py
	$(PYTHON) benchmarks/bench_rss.py

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

format:
	$(PYTHON) -m ruff check --fix src tests benchmarks
	$(PYTHON) -m ruff format src tests benchmarks

clean:  ## caches and run outputs (not the datasets)
	rm -rf .cache outputs multirun bench_results .pytest_cache .ruff_cache
