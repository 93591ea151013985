#!/usr/bin/env bash
# Installs etcd (the server the tests start on free loopback ports) from Debian's packages
# when missing (idempotent). The package's own service is not needed: the tests run theirs.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
etcd --version | head -1
