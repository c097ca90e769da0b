# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the package into it first.
#
# torch is installed on its own first, pinned, so that pip never pulls a CUDA build on a CPU
# machine. GPU users: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# make bench sizes: ratios are measured within one run, so small samples keep it to ~15 min on 2 cores
BENCH_GRADER_N ?= 32
BENCH_PPO_STEPS ?= 4

.PHONY: setup demo demo-seeds test test-fast bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/rbrm demo

# SFT and the reward model once, PPO + evaluation per seed; the table of refusal F1 per seed and its spread
SEEDS ?= 42,43,44
demo-seeds: setup
	$(VENV)/bin/rbrm demo --seeds $(SEEDS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	mkdir -p runs/bench
	$(PY) benchmarks/grader_throughput.py --n $(BENCH_GRADER_N) --json runs/bench/grader_throughput.json
	$(PY) benchmarks/ppo_step.py --steps $(BENCH_PPO_STEPS) --json runs/bench/ppo_step.json
	$(PY) benchmarks/ppo_parts.py --repeats 2 --json runs/bench/ppo_parts.json
	$(PY) benchmarks/report.py runs/bench --out runs/bench/results.md

clean-venv:
	rm -rf $(VENV)
