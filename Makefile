# Two commands for a fresh machine: `make run` (the app on the demo models) and `make test`.
# `make binary` builds the one-file executable dist/tandem; `make smoke` builds and tries it bare.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# llama.cpp is compiled from source by pip, for every x86-64 CPU rather than the one that builds it:
# GGML_NATIVE=OFF (no -march=native), GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS build the CPU backend once per
# instruction-set level (x86-64 baseline, SSE4.2, AVX, AVX2, AVX-512 kinds, AMX) as loadable libraries, and
# app/engine/backends.py loads the best one for the CPU at hand (llama.cpp's ggml_backend_load_all_from_path).
# packaging/cmake/install_backends.cmake puts those libraries into the wheel (llama-cpp-python's install list
# misses them). GGML_RPC adds llama.cpp's RPC backend. GGML_LLAMAFILE=OFF keeps llamafile's sgemm out of
# batches of F16/BF16/Q8_0/Q4_0 weights, whose sums differ from one-token decoding: with it, the demo main
# model (F16) verifies exactly like plain decoding at every batch size; other kernels' differences are found
# at run time (README: Exactness). LLAVA_BUILD=OFF: no multimodal library (never used).
# A GPU build adds its backend: CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90' make setup; then
# packaging/cuda_libs.py puts NVIDIA's runtime wheels into the venv and fills a toolkit's gaps (no cuBLAS).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_RPC=ON \
	-DGGML_LLAMAFILE=OFF -DLLAVA_BUILD=OFF $(CMAKE_ARGS)
BACKENDS_CMAKE := packaging/cmake/install_backends.cmake
# pip caches a wheel built from source by the source's name alone, not by CMAKE_ARGS: one cache per build
# configuration keeps a differently built wheel (an older Tandem's, another project's) from being reused.
BUILD_KEY := $(shell (cat $(BACKENDS_CMAKE); echo '$(LLAMA_CMAKE_ARGS)') | sha256sum | cut -c1-12)
export PIP_CACHE_DIR ?= $(HOME)/.cache/tandem/pip-$(BUILD_KEY)
CUDA_BUILD := $(filter -DGGML_CUDA=on -DGGML_CUDA=ON -DGGML_CUDA=1,$(CMAKE_ARGS))

.PHONY: setup run test bench binary smoke
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(BACKENDS_CMAKE)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --yes llama-cpp-python  # a venv made by an older recipe: its build goes too
	$(if $(CUDA_BUILD),$(PY) packaging/cuda_libs.py,true) > $(VENV)/cuda-cmake-args
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$(cat $(VENV)/cuda-cmake-args) \
		-DCMAKE_PROJECT_llama_cpp_INCLUDE=$(CURDIR)/$(BACKENDS_CMAKE)" \
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
