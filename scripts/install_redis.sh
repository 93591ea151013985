#!/usr/bin/env bash
# Installs redis-server from Debian's packages when it is not on PATH (idempotent).
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
"$(dirname "$0")/apt_install.sh" redis-server
# The package may start a system instance; the tests start their own on free ports.
command -v redis-server
