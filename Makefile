# Fresh machine: `make bench` runs the main job, `make test` runs the tests (lint, pytest
# tests/, the Triton tests again under triton 3.6, and the GPU check's CPU smoke run).
# Both create ./.venv and install what they need into it on first use.
# TORCH picks the torch wheel; the default pin is the tested CPU build (no CUDA
# downloads). On a GPU machine use e.g. `make test TORCH=torch`.
#
# `make test` also runs the tests of the Triton kernels (the offline compile check for
# sm_90 / sm_80 and the interpreter tests) under the GPU machine's triton, TRITON36, in a
# second small venv, ./.venv-triton36 (torch, that triton, numpy, pytest; the project is
# taken from this checkout by PYTHONPATH). `make test-triton36` runs only that part.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The C++ backend is built on first use into this checkout (not the shared ~/.cache), so
# no run waits on another checkout's build lock or loads a library built from other sources.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions
STAMP := $(VENV)/.installed

TRITON36 ?= triton==3.6.0
VENV36 ?= .venv-triton36
STAMP36 := $(VENV36)/.installed
# The tests that exercise fastvit_kernels/triton, selected here, in one place: the compile
# check and the per-op files less their cpp cases (those would load the C++ extension).
TRITON_TESTS ?= tests/ops/test_triton_compile.py tests/ops/test_attention.py \
	tests/ops/test_layer_norm.py tests/ops/test_linear_gelu.py tests/ops/test_patch_embed.py \
	tests/ops/test_linear.py tests/ops/test_varlen_attention.py
TRITON_TESTS_K ?= not cpp

.PHONY: bench test test-triton36 lint clean-venv gpu-check gpu-check-smoke

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Only triton (and a numpy its interpreter works with: 3.6 calls int() on 1-element arrays,
# an error since numpy 2.4) are installed here; torch, pytest and the rest come from
# $(VENV) through a .pth file, which puts them after this venv's own packages on sys.path.
$(STAMP36): $(STAMP)
	$(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/pip install --quiet "$(TRITON36)" "numpy<2.4"
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_path('purelib'))" \
		> "$$($(VENV36)/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))")/fastvit-main-venv.pth"
	touch $(STAMP36)

bench: $(STAMP)
	$(BIN)/fastvit bench

PYTEST36 = PYTHONPATH=$(CURDIR) $(VENV36)/bin/python -m pytest $(TRITON_TESTS) -k "$(TRITON_TESTS_K)"

test: $(STAMP) $(STAMP36)
	$(BIN)/ruff check vit bench tests fastvit_kernels
	$(BIN)/python -m pytest tests/
	$(PYTEST36)
	$(MAKE) --no-print-directory gpu-check-smoke

test-triton36: $(STAMP36)
	$(PYTEST36)

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
	rm -rf $(VENV) $(VENV36)
