# The two commands a newcomer needs: `make demo` (the whole exit on the local lab) and `make test`.
# Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# Two pytest workers, a test module each at a time (pytest-xdist): every worker starts its own
# servers on free ports, and a module's fixtures stay in one process. `make test PYTEST_ARGS=` runs
# the suite in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test install lab-down bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/exitplan demo

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lab-down: $(VENV)/.installed
	$(VENV)/bin/exitplan lab down

bench: $(VENV)/.installed
	$(PY) bench/bench_migrate.py

clean:
	rm -rf $(VENV) deploy/lab/node_modules deploy/lab/ministack/venv .pytest_cache
