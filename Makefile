# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The test database (pytest-django creates test_<name> on this server) and servers.
TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/electorate

.PHONY: demo test install install-test system-deps lint bench bench-failover clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

system-deps:
	./scripts/install-system-deps.sh

demo: install
	$(BIN)/python manage.py demo

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install-test system-deps lint
	DATABASE_URL=$(TEST_DATABASE_URL) SECRET_KEY=test-only ELECTORATE_HTTPS=0 $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-test system-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-failover: install-test system-deps
	$(BIN)/python bench/failover.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
