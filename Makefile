# toydiff: `make run` (set up + the main job on Two Moons), `make test` (set up + the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch on these machines' disk; `make TORCH=torch` takes PyPI's default (CUDA) build.
TORCH  ?= torch==2.13.0
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup browser run test fast-test bench bench-all gpu-wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

run: setup
	$(BIN)/toydiff run $(ARGS)

# The report's browser test drives Debian's chromium with chromium-driver: installed here when missing (as root,
# with apt-get); elsewhere the test is skipped, unless TOYDIFF_REQUIRE_BROWSER=1 (CI) makes that a failure.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; } || \
	  echo "note: no chromium and chromedriver here; the report's browser test will be skipped"

# The suite in a random order (pytest-randomly; the seed is printed first, `make test TEST_SEED=N` repeats an order):
# first on one pytest-xdist worker per core, each pinned to its own core (tests/conftest.py), then the tests marked
# `serial` (several processes or threads: they need both cores) alone. A part that PYTEST_ARGS (say -k NAME) leaves
# empty is not a failure (pytest's exit code 5).
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
ifndef TEST_SEED
TEST_SEED := $(shell $(PYTHON) -c "import random; print(random.randrange(10**8))")
endif
PYTEST = $(BIN)/python -m pytest --randomly-seed=$(TEST_SEED)

test: setup browser
	@echo "tests in a random order: seed $(TEST_SEED) (make test TEST_SEED=$(TEST_SEED) repeats it)"
	$(PYTEST) -n $(JOBS) -m "not serial" $(PYTEST_ARGS) || [ $$? = 5 ]
	$(PYTEST) -m serial $(PYTEST_ARGS) || [ $$? = 5 ]

fast-test: setup
	@echo "tests in a random order: seed $(TEST_SEED) (make fast-test TEST_SEED=$(TEST_SEED) repeats it)"
	$(PYTEST) -n $(JOBS) -m "not slow and not serial" $(PYTEST_ARGS) || [ $$? = 5 ]
	$(PYTEST) -m "serial and not slow" $(PYTEST_ARGS) || [ $$? = 5 ]

# The performance benchmarks (about 15 minutes here): speed, scaling and memory, time to quality.
bench: setup
	$(BIN)/python benchmarks/speed.py $(ARGS)
	$(BIN)/python benchmarks/time_to_quality.py

# Every benchmark (about 2 hours more): samplers against NFE, few-step generation, the zoo gallery, the
# metrics' null laws on development tables and the verdict's calibration on the held-out panel.
bench-all: bench
	$(BIN)/python benchmarks/nfe.py
	$(BIN)/python benchmarks/fewstep.py
	$(BIN)/python benchmarks/zoo.py
	$(BIN)/python benchmarks/null_tails.py
	$(BIN)/python benchmarks/panel.py

# For benchmarks/gpu_on_device.sh on a lent GPU machine (Python 3.12, no network): the wheels of toydiff's
# dependencies its image lacks, into .whl/ (git-ignored), carried with the call.
GPU_WHEELS ?= pot==0.9.7.post1 tomli-w==1.2.0
gpu-wheels: setup
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
