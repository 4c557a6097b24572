# The two commands a new user needs: `make demo` (main job) and `make test` (the test suite);
# `make lint` runs the static checks CI runs before the tests.
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch is pinned here, not in pyproject.toml: these machines carry the 2.13.0 CPU wheel on disk,
# while an unpinned install would pull a multi-GB CUDA build. The project itself accepts a range.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/mfli demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (rule set in pyproject.toml), mypy on the shared floor, and the floors of the import graph
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) tools/import_graph.py --quiet

bench: setup
	$(VENV)/bin/mfli bench all --json reports/bench.json

clean:
	rm -rf var reports .pytest_cache
