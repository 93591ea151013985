#!/usr/bin/env bash
# Installs nbdkit with its Python plugin and the NBD clients the tests and benchmarks use
# (nbdcopy and nbdfuse from libnbd-bin, qemu-io from qemu-utils, fio with its nbd engine;
# mkfs.ext4/e2fsck and umount for the mkfs test) from Debian's packages when missing
# (idempotent).
set -euo pipefail
missing=()
command -v nbdkit >/dev/null 2>&1 || missing+=(nbdkit)
if ! nbdkit python --version >/dev/null 2>&1; then missing+=(nbdkit-plugin-python); fi
command -v nbdcopy >/dev/null 2>&1 || missing+=(libnbd-bin)
command -v qemu-io >/dev/null 2>&1 || missing+=(qemu-utils)
command -v fio >/dev/null 2>&1 || missing+=(fio)
PATH="$PATH:/usr/sbin:/sbin"
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
command -v umount >/dev/null 2>&1 || missing+=(mount)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
"$(dirname "$0")/apt_install.sh" "${missing[@]}"
nbdkit python --version
