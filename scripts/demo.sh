#!/usr/bin/env bash
# The main job on the embedded sample image, no QEMU needed:
#  1. the one-shot `blkexport mount`: a qcow2 presented as a raw disk over
#     itself, and its first partition as a raw filesystem image;
#  2. the agent: a manifest directory reconciled, an edit followed live.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=$(mktemp -d /tmp/blkexport-demo.XXXXXX)
mkdir "$work/images" "$work/manifests"
img=$work/images/demo.qcow2
part=$work/images/part1.raw
sock=$work/agent.sock
agent_pid=
cleanup() {
  [[ -n $agent_pid ]] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  bin/blkexport umount "$part" >/dev/null 2>&1 || true
  bin/blkexport umount "$img" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
cp samples/demo.qcow2 "$img"
say() { printf '\n$ %s\n' "$*"; "$@"; }

echo "== 1. blkexport mount =="
say file "$img"
# Partition 1 first: once the image itself is exported, its path shows the raw view.
say bin/blkexport mount "$img" "$part" --partition 1 --create-mountpoint --daemonize
say file "$part"
command -v debugfs >/dev/null && say debugfs -R 'cat /README.txt' "$part" 2>/dev/null
say bin/blkexport mount "$img" --daemonize
say file "$img"
command -v sfdisk >/dev/null && say sfdisk -l "$img"
say bin/blkexport umount "$img"
say bin/blkexport umount "$part"
say file "$img"

echo
echo "== 2. blkexport agent =="
sed "s|@IMAGES@|$work/images|" samples/demo-manifest.yaml >"$work/manifests/demo.yaml"
say cat "$work/manifests/demo.yaml"
echo "\$ bin/blkexport agent --manifests $work/manifests --socket $sock --allow-root $work/images &"
bin/blkexport agent --manifests "$work/manifests" --socket "$sock" --allow-root "$work/images" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do bin/blkexport status --socket "$sock" >/dev/null 2>&1 && break; sleep 0.1; done
say bin/blkexport status --socket "$sock"
say file "$img"

echo
echo "# edit the manifest: add partition 1 as its own export; the agent follows within 2 s"
cat >>"$work/manifests/demo.yaml" <<YAML
    - id: demo-p1
      image: $img
      partition: 1
      mountpoint: $part
      create-mountpoint: true
YAML
for _ in $(seq 50); do grep -q 'export ready export="demo-p1"' "$work/agent.log" && break; sleep 0.1; done
say bin/blkexport status --socket "$sock"
say file "$part"

echo
echo "\$ kill -TERM $agent_pid   # the agent flushes and unmounts everything"
kill -TERM "$agent_pid"
wait "$agent_pid"
agent_pid=
say file "$img"
echo
echo "agent log:"
sed 's/^/  /' "$work/agent.log"
