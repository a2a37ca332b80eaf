#!/usr/bin/env bash
# Regenerates samples/demo.qcow2: a 1 GiB disk with an MBR partition table and
# one ext4 partition (2048s..51199s) holding README.txt, stored as a compressed
# qcow2. Needs qemu-img, parted and mkfs.ext4; the demo itself needs none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tree"
printf 'Hello from inside a qcow2 image.\nblkexport presented this ext4 partition as a raw file.\n' >"$work/tree/README.txt"
mkfs.ext4 -q -F -L blkexport-demo -d "$work/tree" "$work/part.ext4" 24M
qemu-img create -q -f raw "$work/disk.raw" 1G
parted -s "$work/disk.raw" 'mklabel msdos' 'mkpart primary ext4 2048s 51199s'
dd if="$work/part.ext4" of="$work/disk.raw" bs=512 seek=2048 conv=notrunc status=none
qemu-img convert -c -f raw -O qcow2 "$work/disk.raw" samples/demo.qcow2
qemu-img info samples/demo.qcow2
