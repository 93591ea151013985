#!/usr/bin/env bash
# Installs what schema work needs (idempotent): the `capnp` compiler, to check
# and inspect schema/tlog_schema.capnp, and pycapnp in the project's .venv,
# which loads the schema at run time (no generated code is committed).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v capnp >/dev/null 2>&1; then
  scripts/apt_install.sh capnproto
fi
if [ ! -x .venv/bin/pip ]; then
  python3 -m venv .venv
fi
.venv/bin/python -c 'import capnp' 2>/dev/null || .venv/bin/pip install -q pycapnp
capnp compile -o- schema/tlog_schema.capnp >/dev/null
echo "capnp $(capnp --version | awk '{print $NF}') and pycapnp ready; schema compiles"
