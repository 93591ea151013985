# Developer entry points. Every target sets up what it needs itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ADDRESS ?= 127.0.0.1:11211

.PHONY: install redis nbd etcd run test lint typecheck check bench soak fuzz fresh-check clean

# pip, not python: a venv made without Debian's python3-venv has python but no pip, and is made again.
# The install compiles the per-block modules (setup.py, mypyc) when it can: a C compiler and
# Python's headers are installed first when missing.
$(BIN)/tlogserver: pyproject.toml setup.py tlog/compiled.py
	@./scripts/install_build_deps.sh $(PY)
	test -x $(BIN)/pip || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/tlogserver

# A build older than its .py files (a pull, an edit) is made again; then the state is printed.
install: $(BIN)/tlogserver
	@$(BIN)/python -c 'import sys; from tlog.compiled import main; sys.exit(main(["--stale"]))' \
	  || $(BIN)/pip install -q --no-deps -e .
	@$(BIN)/python -c 'from tlog.compiled import main; main()'
	@if [ -s build/tlog-pure-python.txt ]; then cat build/tlog-pure-python.txt; fi

# redis-server for the tests: installed from Debian's packages when missing.
redis:
	@command -v redis-server >/dev/null 2>&1 || ./scripts/install_redis.sh

# nbdkit, its Python plugin, nbdcopy and qemu-io for `tlog nbd` and its tests.
nbd:
	@./scripts/install_nbd.sh

# etcd for the configuration-source and vdisk-ownership tests.
etcd:
	@./scripts/install_etcd.sh

run: install
	$(BIN)/tlogserver --address $(ADDRESS) --memory-storage

# The protocol, record, client and server tests (and one of tlog nbd) again on the pure-Python
# path, when the first run was on the compiled one.
PURE_TESTS := tests/test_compiled.py tests/test_protocol.py tests/test_protocol_properties.py \
	tests/test_decoder.py tests/test_fuzz_wire.py tests/test_aggregation.py \
	tests/test_record_keys.py tests/test_client.py tests/test_client_buffer.py \
	tests/test_client_waiters.py tests/test_server.py tests/test_answers.py tests/test_budget.py \
	tests/test_acks.py tests/test_hostile.py \
	tests/test_reliability.py::test_a_server_still_retrying_when_its_client_failed_over_does_not_fork_the_chain \
	tests/test_nbd.py::test_nbd_clients_write_and_the_restore_equals_the_served_image

# Tests run on TEST_WORKERS pytest-xdist workers (0: in the pytest process itself); worksteal
# keeps both busy until the end. The slowest tests are listed after the run.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

test: install redis nbd etcd
	$(PYTEST) --durations=10
	@if $(BIN)/python -c 'import sys; from tlog.compiled import why_pure; sys.exit(why_pure() is not None)'; then \
	  echo "TLOG_NO_EXTENSIONS=1: the pure-Python path"; \
	  TLOG_NO_EXTENSIONS=1 $(PYTEST) $(PURE_TESTS); \
	fi

lint: install
	$(BIN)/ruff check tlog tlogserver tests benchmarks scripts setup.py
	$(BIN)/mypy tlog tlogserver

check: lint test

bench: install redis
	$(BIN)/python benchmarks/run_all.py

# Crash consistency: 100,000 random writes and deletes, tlogserver killed -9 12 times.
soak: install redis
	$(BIN)/python scripts/soak.py --blocks 100000 --kills 12

# The wire parser as imported (compiled when built) against its pure .py, under libFuzzer.
FUZZ_SECONDS ?= 300
fuzz: install
	$(BIN)/python scripts/fuzz_wire.py --seconds $(FUZZ_SECONDS)

# make run and make test on a fresh Debian bookworm (debootstrap, chroot; root, ~10 min).
fresh-check:
	$(PY) scripts/fresh_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
