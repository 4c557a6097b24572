# The two commands a new user needs: `make demo` (main job) and `make test` (the test suite).
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

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

bench: setup
	$(VENV)/bin/mfli bench all --json reports/bench.json

clean:
	rm -rf var reports .pytest_cache
