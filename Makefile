# `make demo` and `make test` each create .venv if it is missing and install ecdist into it.
# torch is pinned to the 2.13.0 CPU wheel here; on GPU machines install your own torch first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ecdist-installed
TORCH ?= torch==2.13.0

.PHONY: install demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/ecdist demo

test: install
	$(PY) -m pytest ecdist tests

clean:
	rm -rf $(VENV) ecdist-demo .pytest_cache .hypothesis
