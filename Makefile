# Two entry points, each self-sufficient on a fresh machine: `make run`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run demo-core test bench fuzz clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m tether.relaydemo

demo-core: $(STAMP)
	$(BIN)/python -m tether.demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench fuzz examples
	$(BIN)/mypy --strict src tests bench
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/flows.py

fuzz: $(STAMP)
	$(BIN)/python fuzz/fuzz_wire.py -atheris_runs=200000

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
