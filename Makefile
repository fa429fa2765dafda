# Set-up is part of every target: a fresh machine needs only `make search` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: build test search bench info clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt
	touch $@

# Compiles fastnas._C against the venv's torch (CUDA kernels too when nvcc is
# there); ninja recompiles only what changed.
build: $(STAMP)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

# The C++ test (CMake build of the same sources, ctest) first, then the Python suite.
test: build
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure
	$(PY) -m pytest -q -ra tests

search: build
	$(VENV)/bin/fastnas search $(ARGS)

bench: build
	$(PY) benchmarks/bench_ops.py $(ARGS)

info: build
	$(PY) -m fastnas.info

clean:
	rm -rf build dist *.egg-info fastnas/*.so
