# `make demo` and `make test` work from a fresh clone: they create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test typecheck lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/learnedopt demo --out runs/demo

# two workers: CI has two cores, and the suite is mostly single-threaded (~11 min serial, ~7 min on two)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2

typecheck: $(STAMP)
	$(VENV)/bin/mypy learnedopt learnedopt_cli learnedopt_experiments meta_train baselines --ignore-missing-imports

lint: $(STAMP)
	$(VENV)/bin/ruff check learnedopt learnedopt_cli learnedopt_experiments meta_train baselines benchmarks examples tests

clean:
	rm -rf runs .pytest_cache
