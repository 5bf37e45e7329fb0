# Fresh machine: `make bench` runs the main job, `make test` runs the tests.
# Both create ./.venv and install what they need into it on first use.
# TORCH picks the torch wheel; the default pin is the tested CPU build (no CUDA
# downloads). On a GPU machine use e.g. `make test TORCH=torch`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bench test lint clean-venv gpu-check gpu-check-smoke

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

bench: $(STAMP)
	$(BIN)/fastvit bench

test: $(STAMP)
	$(BIN)/python -m pytest tests/

lint: $(STAMP)
	$(BIN)/ruff check vit bench tests fastvit_kernels

# One command for a lent GPU (bench/gpu_check): <= 8 minutes, results in OUT. It runs with
# the machine's own python3 (torch + triton preinstalled, no internet), so no venv here.
# GPU_CHECK_ARGS: e.g. --deadline 240 for a shorter rerun.
OUT ?= build/gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(PYTHON) -m bench.gpu_check --out $(OUT) $(GPU_CHECK_ARGS)

# The same script on CPU (Triton interpreter, tiny shapes, ~1 minute): keeps it from rotting.
gpu-check-smoke: $(STAMP)
	PYTHONPATH=. $(BIN)/python -m bench.gpu_check --smoke --out $(OUT)-smoke

clean-venv:
	rm -rf $(VENV)
