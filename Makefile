# The README's commands. Each creates or reuses the virtual environment in $(VENV), installs torch
# and the rest, builds the extension against that torch, and runs.
#   make demo    set up, then run pylora's main job
#   make test    set up, then run the whole test suite
#   make bench   set up, then run the benchmarks at sizes that fit the machine
#   make dist    set up, then build the sdist and a wheel from it into dist/

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# torch 2.14.1 is a CUDA 13.0 build; any torch >= 2.4 works (override: make TORCH=torch==2.6.0 test).
TORCH ?= torch==2.14.1
RUNTIME_DEPS := numpy safetensors tqdm regex
# What setup.py needs besides torch (installed here: the build runs without isolation, against this torch).
BUILD_DEPS := "setuptools>=77" ninja
TEST_DEPS := pytest transformers peft accelerate
# The demo's model comes from transformers (a test dependency too); its figure and `pylora bench`'s
# chart need matplotlib.
DEMO_DEPS := matplotlib
# Optional quantization libraries (pyproject's `quant` extra): the tests of LoRA over a quantized base
# run with them and skip, saying why, without them.
QUANT_DEPS := torchao==0.18.0 bitsandbytes==0.50.2
# A CUDA toolkit's usual home, when nothing says otherwise (setup.py also looks there).
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
MAX_JOBS ?= 2
export CUDA_HOME MAX_JOBS

SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: setup demo test bench dist clean

setup: $(VENV)/.built

$(VENV)/.deps: pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "pylora needs Python 3.10+, this is " + sys.version' 
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "$(TORCH)" $(RUNTIME_DEPS) $(BUILD_DEPS) $(TEST_DEPS) $(DEMO_DEPS) $(QUANT_DEPS)
	touch $@

# --no-build-isolation: the extension must be compiled against the torch it will run with.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/pylora info
	$(VENV)/bin/pylora demo --out pylora-demo

test: setup
	$(VPY) -m pytest

# BENCH_ARGS: more options for `pylora bench` (e.g. make bench BENCH_ARGS="--full --threads 1").
BENCH_ARGS ?=
bench: setup
	$(VENV)/bin/pylora bench all --out bench-results $(BENCH_ARGS)

# The sdist, then a wheel built from it alone (portable CPU kernels, CUDA kernels where setup.py finds
# nvcc), against this venv's torch: the wheel requires that torch release.
dist: $(VENV)/.deps
	rm -rf dist
	$(VPY) -c "from setuptools import build_meta as b; b.build_sdist('dist')"
	$(VPY) -m pip wheel --no-build-isolation --no-deps -w dist dist/pylora-*.tar.gz

clean:
	rm -rf build dist pylora/_C*.so pylora/_build_facts.py pylora.egg-info $(VENV)/.built
