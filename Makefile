# Set-up is part of every target: a fresh machine needs only `make search` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
BUILT := $(VENV)/.fastnas-built
# A build that was asked for the CUDA kernels (FASTNAS_CUDA=1) also serves `build`.
BUILT_CUDA := $(VENV)/.fastnas-built-cuda
# What the extension is built from: when none of it changed, `build` does nothing.
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: build build-cuda lint format test test-cuda-emulation search bench info clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt
	touch $@

# Compiles fastnas._C against the venv's torch (the CUDA kernels too when nvcc
# is there and a GPU is visible). Nothing runs when no source changed; otherwise
# ninja recompiles only the changed files (their objects are kept in build/ext).
build: $(BUILT)

$(BUILT): $(STAMP) $(EXT_SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	rm -f $(BUILT_CUDA)
	touch $@

# The same build with the CUDA kernels compiled even without a GPU (where nvcc
# and a CUDA build of torch are there), so that every test run compiles them.
build-cuda: $(BUILT_CUDA)

$(BUILT_CUDA): $(STAMP) $(EXT_SOURCES)
	FASTNAS_CUDA=1 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@ $(BUILT)

CXX_FILES = $(shell find csrc tests/cpp tests/cuda_emulation -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

# Lint and format checks (ruff, clang-format); `make format` applies the formatters.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_FILES)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_FILES)

# The linters, the C++ test (CMake build of the same sources, the CUDA kernels
# too where nvcc is: compiled for one architecture, a check that setup.py's
# full list repeats), then the Python suite.
test: build-cuda lint
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure
	FASTNAS_CUDA=1 $(PY) -m pytest -q -ra tests

# The CUDA kernels' tests without a GPU: the same kernel code built for the host
# and run by csrc/cuda/emulation.h on CPU tensors (first build: a few minutes), and
# whole DARTS and PC-DARTS steps on them, orchestration included.
test-cuda-emulation: build
	FASTNAS_CUDA_EMULATION=1 $(PY) -m pytest -q -ra tests/test_cuda_kernels.py -k emulation
	FASTNAS_CUDA_EMULATION=1 $(PY) -m pytest -q -ra tests/test_emulated_step.py

search: build
	$(VENV)/bin/fastnas search $(ARGS)

bench: build
	$(PY) benchmarks/bench_ops.py $(ARGS)

info: build
	$(PY) -m fastnas.info

clean:
	rm -rf build dist *.egg-info fastnas/*.so
