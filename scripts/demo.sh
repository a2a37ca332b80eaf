#!/usr/bin/env bash
# The main job on the embedded sample, no QEMU needed: a qcow2 image is
# presented as a raw disk over itself, and its first partition as a raw
# filesystem image, then both are unmounted again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=$(mktemp -d /tmp/blkexport-demo.XXXXXX)
img=$work/demo.qcow2
part=$work/part1.raw
cleanup() {
  bin/blkexport umount "$part" >/dev/null 2>&1 || true
  bin/blkexport umount "$img" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
cp samples/demo.qcow2 "$img"
say() { printf '\n$ %s\n' "$*"; "$@"; }

say file "$img"
# Partition 1 first: once the image itself is exported, its path shows the raw view.
say bin/blkexport mount "$img" "$part" --partition 1 --create-mountpoint --daemonize
say file "$part"
if command -v debugfs >/dev/null; then
  say debugfs -R 'cat /README.txt' "$part" 2>/dev/null
fi
say bin/blkexport mount "$img" --daemonize
say file "$img"
command -v sfdisk >/dev/null && say sfdisk -l "$img"
say bin/blkexport umount "$img"
say bin/blkexport umount "$part"
say file "$img"
