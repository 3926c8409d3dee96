# Two entry points, each self-sufficient on a fresh machine: `make run`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run demo-core test test-compat bench fuzz clean
# The asyncio-facing tests again under a newer Python (its asyncio changed under us
# before: Server.wait_closed, writelines); skipped, saying so, where it is not installed.
COMPAT_PY ?= $(firstword $(wildcard /usr/bin/python3.12 /usr/local/bin/python3.12 \
	$(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
COMPAT_VENV := .venv-compat
COMPAT_TESTS := tests/test_flow_contract.py tests/test_aio_adapter_edges.py \
	tests/test_gateway.py tests/test_hub_contract.py tests/test_mesh_contract.py \
	tests/test_relay_edge_cleanup.py tests/test_tls.py tests/test_hub_tls.py

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
	$(MAKE) --no-print-directory test-compat

test-compat:
	@if $(COMPAT_PY) -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then \
	  test -d $(COMPAT_VENV) || $(COMPAT_PY) -m venv $(COMPAT_VENV); \
	  $(COMPAT_VENV)/bin/pip install -q --upgrade pip && \
	  $(COMPAT_VENV)/bin/pip install -q -e '.[dev]' && \
	  $(COMPAT_VENV)/bin/python -V && \
	  $(COMPAT_VENV)/bin/pytest -q -p no:cacheprovider $(COMPAT_TESTS); \
	else echo "test-compat: no $(COMPAT_PY) (Python >= 3.12) here: skipped"; fi

bench: $(STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/flows.py

fuzz: $(STAMP)
	$(BIN)/python fuzz/fuzz_wire.py -atheris_runs=200000

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
