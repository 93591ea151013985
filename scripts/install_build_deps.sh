#!/usr/bin/env bash
# What compiling tlog's per-block modules needs (setup.py, mypyc): a C compiler and the headers
# of the Python the venv is made with. Installed from Debian's packages when missing
# (idempotent). Without them tlog still installs, as pure Python: so a failure here warns and
# does not stop `make install`.
set -uo pipefail
PY="${1:-python3}"
include="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("include"))')"
if command -v cc >/dev/null 2>&1 && [ -f "$include/Python.h" ]; then
  exit 0
fi
version="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
packages="gcc libc6-dev"
# Debian's python3.X-dev for Debian's python; another Python (pyenv, a build of one's own)
# brings its headers with it, and only the compiler can be missing.
case "$include" in
  /usr/include/*) packages="$packages python$version-dev" ;;
esac
if ! "$(dirname "$0")/apt_install.sh" $packages; then
  echo "tlog: could not install $packages: the per-block modules will not be compiled" >&2
fi
exit 0
