#!/usr/bin/env bash
# Installs redis-server from Debian's packages when it is not on PATH (idempotent).
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq redis-server >/dev/null
# The package may start a system instance; the tests start their own on free ports.
command -v redis-server
