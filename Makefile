# make demo  -> offline demo (tiny built-in model, local corpus, ./activations)
# make test  -> the whole test suite (what CI runs)
# (install: `.[extract,dev]`; reading sets alone needs only the base install, `pip install .`)
# make lint  -> ruff check, ruff format --check, mypy (CI runs it before the tests)
# make test-fast -> the inner loop, the unit tier: the tests that need no Prefect, no process of their own, no S3,
#                   no hub, no deployment and are not slow (markers: pyproject.toml, tests/conftest.py)
VENV    ?= .venv
PY      := $(VENV)/bin/python
# The CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build. On a GPU machine use
# e.g. `make TORCH=torch==2.13.0 ...` with the CUDA index configured for pip.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
DEMO_STORE ?= ./activations
DEMO_ARGS ?= --max-tokens 32768 --shard-tokens 8192 --store $(DEMO_STORE)

UNIT_TIER := not (prefect or subprocess or s3 or hub or deployment or slow)
# `make test` runs the suite in this many pytest-xdist workers, whole files each (tests that share a module's
# server stay together); most of the slow tests wait on servers and processes, so three keep 2 cores busy.
TEST_WORKERS ?= 3

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e '.[extract,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/actcache extract $(DEMO_ARGS)
	$(VENV)/bin/actcache ls $(DEMO_STORE)
	@echo "(actcache and its Python are in $(VENV): run \`source $(VENV)/bin/activate\` for the commands above)" >&2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "$(UNIT_TIER)"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf activations .pytest_cache .mypy_cache
