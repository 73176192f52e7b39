# Two commands for a fresh machine: `make run` (the app on the demo models) and `make test`.
# `make binary` builds the one-file executable dist/tandem; `make smoke` builds and tries it bare.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# llama.cpp is compiled from source by pip. GGML_LLAMAFILE=OFF keeps llamafile's sgemm out of batches of
# F16/BF16/Q8_0/Q4_0 weights, whose sums differ from one-token decoding: with it, the demo main model (F16)
# verifies exactly like plain decoding at every batch size. Other kernels still differ (repacked and tiled
# K-quants); the engine's self-check finds them at run time (README: Exactness). Our own pip cache keeps
# this build apart from a default-flag wheel pip may have cached for other projects.
export CMAKE_ARGS ?= -DGGML_LLAMAFILE=OFF
export PIP_CACHE_DIR ?= $(HOME)/.cache/tandem/pip

.PHONY: setup run test bench binary smoke
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

run: setup
	$(VENV)/bin/tandem $(ARGS)

test: setup
	$(PY) -m ruff check app tests bench
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench.py $(ARGS)

binary: setup
	bash packaging/build.sh

smoke: binary
	bash packaging/smoke_test.sh dist/tandem
