# The two set-up commands of the README, and the pieces they are made of.
#   make run    installs the package and runs the main job (generation on the bundled model pair)
#   make test   installs the package with test extras and runs the test suite
PY ?= python3
PIP := $(PY) -m pip

.PHONY: torch install install-test run test lint nvcc-check bench-smoke wheel wheels clean

# Install torch only when none is importable: an existing (e.g. CUDA) build is never replaced, and on
# a machine without one `torch==2.13.0` is what this project is tested against.
torch:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"

# --no-build-isolation: compile eagle_kernels._C against the torch installed above.
install: torch
	$(PIP) install "setuptools>=77" ninja numpy
	$(PIP) install --no-build-isolation -e .

install-test: torch
	$(PIP) install "setuptools>=77" ninja numpy
	$(PIP) install --no-build-isolation -e ".[test]"

# The main job: EAGLE generation with the bundled tiny-code pair (target + draft head in eagle/assets).
# Exported and expanded by the shell from the environment, so quotes and $ in a prompt reach the model
# as typed (PROMPT='print("hi")' make run).
PROMPT ?= def fibonacci(n):
export EAGLE_RUN_PROMPT := $(value PROMPT)
run: install
	$(PY) -m eagle info
	$(PY) -m eagle generate "$$EAGLE_RUN_PROMPT"

# Tests use one intra-op thread each (tests/conftest.py), so one worker per core.
PYTEST_WORKERS ?= auto
test: install-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS)

lint:
	ruff check .
	ruff format --check .

nvcc-check:
	PYTHON='$(PY)' bash scripts/nvcc_check.sh

# Every microbenchmark once, untimed (CI); real timings: pytest bench/ --benchmark-only
bench-smoke:
	$(PY) -m pytest bench -q --benchmark-disable -n $(PYTEST_WORKERS)

wheel: torch
	$(PIP) install "setuptools>=77" ninja numpy build
	$(PY) -m build --wheel --no-isolation

# One wheel per CUDA toolkit: make wheels CUDA="12.4 12.8" (needs /usr/local/cuda-X.Y for each).
wheels: torch
	$(PIP) install "setuptools>=77" ninja numpy build
	PYTHON='$(PY)' bash scripts/build_wheels.sh $(CUDA)

clean:
	rm -rf build dist *.egg-info eagle_kernels/_C*.so eagle_kernels/_build_info.py
