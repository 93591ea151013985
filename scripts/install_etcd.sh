#!/usr/bin/env bash
# Installs etcd (the server the tests start on free loopback ports) from Debian's packages
# when missing (idempotent). The package's own service is not needed: the tests run theirs.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
  exit 0
fi
"$(dirname "$0")/apt_install.sh" --no-install-recommends etcd-server
# sed, not head: head exits after the first line and etcd, still writing, would die of SIGPIPE,
# which pipefail turns into this script's failure (exit 141), depending on timing.
etcd --version | sed -n 1p
