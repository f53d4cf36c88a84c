# usbmirror: `make demo` and `make test` do all set-up on a fresh Debian 12 machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
PYTEST_ARGS ?=
# two pytest-xdist workers, each running one queue of the real-kernel tests (host_tests/conftest.py) and a share of the rest
TEST_WORKERS ?= 2
XDIST  := -n $(TEST_WORKERS) --dist loadgroup
FUZZ_SECONDS ?= 20
FUZZ_RUNS ?=
TORTURE_SECONDS ?= 120

.PHONY: help setup test test-fast demo bench fuzz torture lint flash clean

help:
	@echo "make setup   install Debian packages, a venv and the pinned Python packages"
	@echo "make demo    local + remote unit on this machine, a real kernel (QEMU) writing through USB/IP"
	@echo "make test    every host test, the real-kernel tests in QEMU included"
	@echo "make bench   throughput and latency figures, each beside the raw rate of the same disk"
	@echo "make fuzz    atheris over the CBW/BOT, CDB/SCSI, USB/IP, journal, journey, config and iSCSI parsers"
	@echo "            (FUZZ_SECONDS=20 each, or FUZZ_RUNS=1000000 inputs each; kept corpus host_tests/fuzz/corpus/)"
	@echo "make torture a seeded fault campaign (TORTURE_SEED=, TORTURE_SECONDS=$(TORTURE_SECONDS), TORTURE_STEPS=)"
	@echo "make lint    ruff + mypy --strict + import-linter (the layers in .importlinter)"
	@echo "make flash BOARD=<profile> TARGET=<user@host|mounted root>   install onto a board"

setup: $(STAMP)

$(STAMP): pyproject.toml hw/setup_host.sh
	hw/setup_host.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,board,fuzz]'
	touch $@

test: setup
	$(PY) -m pytest host_tests $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest host_tests $(XDIST) -m "not realkernel and not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m hw.demo

bench: setup
	$(PY) bench/run_all.py

fuzz: setup
	@mkdir -p .cache/fuzz; set -e; for f in host_tests/fuzz/fuzz_*.py; do \
		n=$$(basename $$f .py); kept=host_tests/fuzz/corpus/$$n; mkdir -p .cache/fuzz/$$n $$kept; \
		if [ -n "$(FUZZ_RUNS)" ]; then limit=-atheris_runs=$(FUZZ_RUNS); else limit=-max_total_time=$(FUZZ_SECONDS); fi; \
		echo "== $$n ($$limit, kept corpus $$kept, new inputs .cache/fuzz/$$n)"; \
		$(PY) $$f .cache/fuzz/$$n $$kept $$limit -print_final_stats=1 -artifact_prefix=.cache/fuzz/$$n- \
			> .cache/fuzz/$$n.log 2>&1 \
			|| { tail -n 60 .cache/fuzz/$$n.log; echo "FUZZ FAILURE in $$n: the input is .cache/fuzz/$$n-crash-*;" \
			     "copy it into $$kept/ so the test suite replays it"; exit 1; }; \
		grep -E 'stat::number_of_executed_units|Done' .cache/fuzz/$$n.log | tail -n 2; \
		$(PY) $$f -merge=1 $$kept .cache/fuzz/$$n > .cache/fuzz/$$n.merge.log 2>&1 \
			|| { tail -n 20 .cache/fuzz/$$n.merge.log; exit 1; }; \
		echo "   kept corpus: $$(ls $$kept | wc -l) inputs"; \
	done

torture: setup
	TORTURE_SECONDS=$(TORTURE_SECONDS) TORTURE_SEED=$(TORTURE_SEED) TORTURE_STEPS=$(TORTURE_STEPS) TORTURE_TRACE=$(TORTURE_TRACE) $(PY) -m host_tests.torture

lint: setup
	$(VENV)/bin/ruff check gadget firmware hw bench host_tests
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy host_tests/test_conformance_*.py
	$(VENV)/bin/lint-imports --no-cache

-include hw/flash/flash.mk

clean:
	rm -rf .cache build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
