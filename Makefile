# Two entry points, each self-sufficient on a fresh machine: `make run`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run demo-core test test-suite test-legs test-compat compiled test-compiled test-compiled-built \
	bench fuzz clean
# The asyncio-facing tests again under each newer Python found (its asyncio changed
# under us before: Server.wait_closed, writelines), each in its own venv, the versions
# side by side (the tests mostly wait on sockets); a version not installed is skipped,
# saying so.
COMPAT_VERSIONS ?= 3.12 3.13
COMPAT_TESTS := tests/test_flow_contract.py tests/test_aio_adapter_edges.py \
	tests/test_gateway.py tests/test_hub_contract.py tests/test_mesh_contract.py \
	tests/test_relay_edge_cleanup.py tests/test_tls.py tests/test_hub_tls.py

# The compiled build (TETHER_COMPILE=1: the data path through mypyc, see setup.py) is
# tested on the modules it compiles. make test builds it while ruff and mypy run, without
# C optimisation (TETHER_COMPILE_OPT=0: two thirds of the build time, the same code);
# `make compiled` alone builds it as installed (-O3).
COMPILED_TESTS := tests/test_link.py tests/test_flowstate.py tests/test_liveness.py \
	tests/test_datapath.py tests/test_readbuf.py tests/test_heldreads.py tests/test_bridge.py \
	tests/test_flow_contract.py tests/test_gateway.py tests/test_relay_edge_cleanup.py \
	tests/test_tls.py tests/test_inflight.py tests/test_sendqueue.py \
	tests/test_ids_exports.py tests/test_aio_adapter_edges.py
COMPILED := build/compiled

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m tether.relaydemo

demo-core: $(STAMP)
	$(BIN)/python -m tether.demo

# (Without a C compiler the compiled leg is skipped, saying so; .ci/run installs one.)
test: $(STAMP)
	@rm -rf $(COMPILED); if command -v cc >/dev/null 2>&1; then \
	  ( TETHER_COMPILE_OPT=0 $(MAKE) --no-print-directory compiled ) \
	  > .build-compiled.log 2>&1; else echo "no C compiler: the compiled leg is skipped" \
	  > .build-compiled.log; fi & bpid=$$!; \
	rc=0; $(BIN)/ruff check src tests bench fuzz examples || rc=1; \
	$(BIN)/mypy --strict src tests bench || rc=1; \
	wait $$bpid || { cat .build-compiled.log; rc=1; }; exit $$rc
	$(MAKE) --no-print-directory test-suite
	$(MAKE) --no-print-directory test-legs

# The whole suite, as two pytest processes side by side: the tests marked `netns`
# (faults across network namespaces: 20 tests, ~3 of the suite's 7 minutes, spent
# mostly waiting on timeouts, delays and losses they set up) beside all the others.
# The netns group prints its output when both are done.
test-suite:
	@$(BIN)/pytest -q -p no:cacheprovider -m netns > .test-netns.log 2>&1 & npid=$$!; \
	rc=0; $(BIN)/pytest -q -m "not netns" || rc=1; \
	wait $$npid || rc=1; cat .test-netns.log; exit $$rc

# The compat legs and the compiled leg (built already) side by side; each prints its
# output when all are done.
test-legs:
	@if [ -d $(COMPILED) ]; then $(MAKE) --no-print-directory test-compiled-built; \
	  else cat .build-compiled.log; fi > .test-compiled.log 2>&1 & \
	cpid=$$!; rc=0; $(MAKE) --no-print-directory test-compat || rc=1; \
	wait $$cpid || rc=1; cat .test-compiled.log; exit $$rc

compiled: $(STAMP)
	rm -rf build  # (setuptools would reuse the objects of a build at another -O level)
	TETHER_COMPILE=1 $(BIN)/pip install -q --no-deps --target $(COMPILED) .

test-compiled: compiled
	$(MAKE) --no-print-directory test-compiled-built

test-compiled-built:
	PYTHONPATH=$(COMPILED) TETHER_EXPECT_COMPILED=1 $(BIN)/pytest -q -p no:cacheprovider \
	  $(COMPILED_TESTS)

test-compat:
	@pids=; for v in $(COMPAT_VERSIONS); do ( \
	  py=$$(ls /usr/bin/python$$v /usr/local/bin/python$$v \
	    $(HOME)/.pyenv/versions/$$v*/bin/python$$v 2>/dev/null | head -n 1); \
	  py=$${py:-$$(command -v python$$v)}; \
	  if [ -z "$$py" ]; then echo "test-compat: no python$$v here: skipped"; exit 0; fi; \
	  venv=.venv-compat-$$v; \
	  { test -d $$venv || $$py -m venv $$venv; } && \
	  $$venv/bin/pip install -q --upgrade pip && \
	  $$venv/bin/pip install -q -e '.[dev]' && \
	  $$venv/bin/python -V && \
	  $$venv/bin/pytest -q -p no:cacheprovider $(COMPAT_TESTS) \
	  ) > .venv-compat-$$v.log 2>&1 & pids="$$pids $$!"; done; \
	rc=0; for pid in $$pids; do wait $$pid || rc=1; done; \
	for v in $(COMPAT_VERSIONS); do cat .venv-compat-$$v.log; done; exit $$rc

bench: $(STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/flows.py

fuzz: $(STAMP)
	$(BIN)/python fuzz/fuzz_wire.py -atheris_runs=200000

clean:
	rm -rf $(VENV) .venv-compat* .build-compiled.log .test-compiled.log .test-netns.log build src/*.egg-info \
	  .pytest_cache \
	  .mypy_cache .ruff_cache
