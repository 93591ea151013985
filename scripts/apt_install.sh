#!/usr/bin/env bash
# Installs Debian packages for the install scripts: apt-get update, then apt-get install with the
# given arguments (packages, or options such as --no-install-recommends), as root or through sudo.
# Two installs at once (make -j, two checkouts running make test) would fail on apt's locks, so
# ours take turns under a lock on apt's lists directory, and dpkg's own lock, when another apt
# holds it, is waited for (up to 10 min) rather than failed on.
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: $0 [apt-get install option ...] PACKAGE ..." >&2
  exit 2
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
# Through env, not export: sudo drops the caller's environment.
$SUDO env DEBIAN_FRONTEND=noninteractive flock /var/lib/apt/lists sh -c '
  apt-get update -qq
  apt-get install -y -qq -o DPkg::Lock::Timeout=600 "$@" >/dev/null
' sh "$@"
