#!/usr/bin/env bash
# Installs what schema work needs (idempotent): the `capnp` compiler, to check
# and inspect schema/tlog_schema.capnp, and pycapnp in the project's .venv,
# which loads the schema at run time (no generated code is committed).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v capnp >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq capnproto >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -c 'import capnp' 2>/dev/null || .venv/bin/pip install -q pycapnp
capnp compile -o- schema/tlog_schema.capnp >/dev/null
echo "capnp $(capnp --version | awk '{print $NF}') and pycapnp ready; schema compiles"
