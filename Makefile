# Developer entry points. Every target sets up what it needs itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ADDRESS ?= 127.0.0.1:11211

.PHONY: install redis nbd etcd run test lint typecheck check bench soak fuzz fresh-check clean

# pip, not python: a venv made without Debian's python3-venv has python but no pip, and is made again.
$(BIN)/tlogserver: pyproject.toml
	test -x $(BIN)/pip || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/tlogserver

install: $(BIN)/tlogserver

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

test: install redis nbd etcd
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check tlog tlogserver tests benchmarks scripts
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
