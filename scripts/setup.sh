#!/usr/bin/env bash
# Installs what blkexport needs on Debian 12 (idempotent), then npm ci and the build.
#   scripts/setup.sh          runtime only: libfuse3-dev, zlib1g-dev, libzstd-dev (native-fuse/), libfuse2 (fuse-native's
#                             libfuse.so.2, the fallback), fuse (fusermount),
#                             and build-essential/python3 when missing (node-gyp builds native/)
#   scripts/setup.sh --test   also the test oracle and tools: qemu-utils, qemu-system-common
#                             (qemu-storage-daemon), fio, parted, fdisk, e2fsprogs, file,
#                             libnbd-bin (nbdinfo, nbdcopy) and nbdkit: the NBD export's real clients
set -euo pipefail
cd "$(dirname "$0")/.."

# libfuse3-dev: our own FUSE binding (native-fuse/) builds against it; without it exports use
# fuse-native (libfuse2), which is slower (docs/fuse-export.md). zlib1g-dev and libzstd-dev: the
# binding inflates compressed qcow2 clusters in its worker threads with zlib and libzstd.
pkgs=(libfuse2 libfuse3-dev zlib1g-dev libzstd-dev file fdisk)
# The native helper (native/: OFD image locks, peer credentials) is built by node-gyp offline
# against the running Node's headers: it needs make, a C compiler and python3.
command -v make >/dev/null 2>&1 && command -v cc >/dev/null 2>&1 || pkgs+=(build-essential)
command -v python3 >/dev/null 2>&1 || pkgs+=(python3)
# fusermount comes from 'fuse' (libfuse 2) or 'fuse3'; they conflict, either will do.
if ! command -v fusermount >/dev/null 2>&1 && ! command -v fusermount3 >/dev/null 2>&1; then pkgs+=(fuse); fi
if [[ "${1:-}" == "--test" ]]; then
  pkgs+=(qemu-utils qemu-system-common fio parted fdisk e2fsprogs util-linux)
  # systemd-notify: the Type=notify test talks to a stand-in notification socket through it.
  pkgs+=(systemd)
  # kubectl renders the Kustomize files in test/deploy (any kubectl will do; Debian's is kubernetes-client).
  command -v kubectl >/dev/null 2>&1 || pkgs+=(kubernetes-client)
  # the NBD export's real clients (nbdinfo, nbdcopy) and reference server
  pkgs+=(libnbd-bin nbdkit)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -c /dev/fuse ]]; then
  echo "setup: warning: /dev/fuse is missing (modprobe fuse, or run the container with --device /dev/fuse)" >&2
fi

# npm ci only when the lock changed since the last install.
stamp=node_modules/.blkexport-lock-stamp
if [[ ! -f $stamp ]] || ! cmp -s package-lock.json "$stamp"; then
  npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json "$stamp"
fi
npm run --silent build
