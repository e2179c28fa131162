# reflowpairs: `make demo` runs the pipeline on the bundled tiny world, `make test` runs the offline suite.
# Both create .venv on Python 3.12 (found by scripts/find-python312.sh) and install the project first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RP := $(VENV)/bin/reflowpairs
DEMO ?= demo_out
STAMP := $(VENV)/.installed

.PHONY: venv demo test clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || "$$(scripts/find-python312.sh)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# dataset -> teacher -> pairs -> validate -> student -> eval, all offline on 2 CPU cores.
demo: $(STAMP)
	$(PY) examples/demo.py --out $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(DEMO) .pytest_cache
