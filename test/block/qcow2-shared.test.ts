/**
 * Shared host clusters (src/block/format/qcow2/shared.ts): a hand-made image
 * whose guest clusters 0 and 1 map one host cluster with COPIED set and
 * refcount 1 (test/block/shared-image.ts). Opened writable, every write,
 * write-zeroes and discard touching either is refused (EIO, the reason names
 * both guest clusters and the host offset), the other keeps its bytes, the
 * binding is never offered the cluster for in-place writes, and the rest of
 * the image is written as usual. A referenced cluster whose refcount says
 * free is never handed out by the allocator.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openImage } from '../../src/block/index.js';
import type { BlockNode } from '../../src/block/types.js';
import { Errno, isBlkError } from '../../src/errors.js';
import { needTools, qemuImg, qemuIo, run, tempDir } from '../helpers/tools.js';
import { convertToRaw } from './images.js';
import { SHARED_CLUSTER as CS, makeSharedImage } from './shared-image.js';

async function readAt(node: BlockNode, off: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  await node.read(off, b);
  return b;
}

/** Whether the binding may write guest [off, off+len) in place (mapHostCached marks it writable). */
function writableInPlace(node: BlockNode, off: number, len: number): boolean {
  const x = node.mapHostCached?.(off, len) ?? [];
  return x.length > 0 && x.every((p) => 'fd' in p && p.writable === true);
}

const refusedShared = (op: string, gc: number) => (e: unknown) => {
  assert.ok(isBlkError(e), String(e));
  assert.equal(e.code, 'IMAGE_CORRUPT');
  assert.equal(e.errno, Errno.EIO);
  assert.match(
    e.message,
    new RegExp(
      `^${op} of guest cluster ${gc} .*host cluster at offset 0x50000 is referenced 2 times but its refcount is 1 \\(guest clusters 0, 1 use it\\)`,
    ),
  );
  return true;
};

test('two guest clusters on one COPIED host cluster: writes to either are refused, the other keeps its bytes', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const { path, host } = makeSharedImage(dir);
  assert.equal(host, 0x50000);
  const img = await openImage({ filename: path, readOnly: false, format: 'qcow2' });
  let open = true;
  t.after(() => (open ? img.close() : undefined));
  const node = img.node;
  const aa = Buffer.alloc(CS, 0xaa);
  assert.ok((await readAt(node, 0, 2 * CS)).equals(Buffer.concat([aa, aa])), 'both read guest cluster 0');

  await assert.rejects(node.write(CS + 512, Buffer.alloc(4096, 0x11)), refusedShared('write', 1));
  await assert.rejects(node.write(0, Buffer.alloc(CS, 0x22)), refusedShared('write', 0));
  // A write spanning a good cluster and a shared one is refused whole, before anything is written.
  await assert.rejects(node.write(2 * CS - 512, Buffer.alloc(1024, 0x33)), refusedShared('write', 1));
  await assert.rejects(node.writeZeroes(0, CS, { mayUnmap: true }), refusedShared('write-zeroes', 0));
  await assert.rejects(node.discard(CS, CS), refusedShared('discard', 1));
  assert.ok((await readAt(node, 0, 2 * CS)).equals(Buffer.concat([aa, aa])), 'nothing changed either');

  // The binding's in-place writes are never offered the shared cluster; a cluster of its own is.
  assert.equal(writableInPlace(node, 0, 4096), false);
  assert.equal(writableInPlace(node, CS, 4096), false);
  await node.write(2 * CS, Buffer.alloc(CS, 0x44));
  await readAt(node, 2 * CS, CS);
  assert.equal(writableInPlace(node, 2 * CS, 4096), true, 'an unshared cluster is writable in place');
  await node.write(2 * CS + 100, Buffer.alloc(100, 0x55));
  await node.flush();
  await img.close();
  open = false;

  // Not flagged corrupt: only the shared cluster is refused. qemu-img sees what it saw before.
  const info = JSON.parse(qemuImg('info', '--output=json', path)) as {
    'format-specific': { data: { corrupt: boolean } };
  };
  assert.equal(info['format-specific'].data.corrupt, false);
  const check = run('qemu-img', ['check', path]);
  assert.match(check.stdout + check.stderr, /ERROR cluster 5 refcount=1 reference=2/);
  const raw = readFileSync(convertToRaw(path, join(dir, 'out.raw')));
  const want = Buffer.alloc(1 << 20);
  want
    .fill(0xaa, 0, 2 * CS)
    .fill(0x44, 2 * CS, 3 * CS)
    .fill(0x55, 2 * CS + 100, 2 * CS + 200);
  assert.ok(raw.equals(want), 'qemu-img reads both clusters unchanged and the good write');
});

test('a referenced cluster whose refcount says free is never handed out by the allocator', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const path = join(dir, 'free.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', path, '1M');
  qemuIo('-f', 'qcow2', '-c', 'write -P 0xaa 0 64k', path);
  // The refcount of guest cluster 0's host cluster (5: header, L1, refcount table, block, L2 before it) := 0.
  const fd = openSync(path, 'r+');
  try {
    const b = Buffer.alloc(8);
    readSync(fd, b, 0, 8, 48); // refcount_table_offset
    readSync(fd, b, 0, 8, Number(b.readBigUInt64BE(0)));
    const block = Number(b.readBigUInt64BE(0));
    const rc = Buffer.alloc(2);
    readSync(fd, rc, 0, 2, block + 5 * 2);
    assert.equal(rc.readUInt16BE(0), 1);
    writeSync(fd, Buffer.alloc(2), 0, 2, block + 5 * 2);
  } finally {
    closeSync(fd);
  }
  const img = await openImage({ filename: path, readOnly: false, format: 'qcow2' });
  t.after(() => img.close());
  await assert.rejects(img.node.write(0, Buffer.alloc(512, 1)), /referenced 1 times but its refcount is 0/);
  // New clusters land anywhere but on cluster 5, which guest cluster 0 still uses.
  for (let gc = 1; gc < 8; gc++) await img.node.write(gc * CS, Buffer.alloc(CS, 0x10 + gc));
  assert.ok((await readAt(img.node, 0, CS)).equals(Buffer.alloc(CS, 0xaa)), 'guest cluster 0 kept its bytes');
  for (let gc = 1; gc < 8; gc++)
    assert.ok((await readAt(img.node, gc * CS, CS)).equals(Buffer.alloc(CS, 0x10 + gc)));
});

test('two L1 entries naming one L2 table: writes under either are refused, also where nothing is allocated', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const path = join(dir, 'table.qcow2');
  const span = 512 * 1024 * 1024; // what one L2 table maps with 64 KiB clusters
  qemuImg('create', '-q', '-f', 'qcow2', path, String(2 * span));
  qemuIo('-f', 'qcow2', '-c', 'write -P 0xaa 0 64k', '-c', `write -P 0xbb ${span} 64k`, path);
  const fd = openSync(path, 'r+');
  try {
    const b = Buffer.alloc(8);
    readSync(fd, b, 0, 8, 40);
    const l1 = Number(b.readBigUInt64BE(0));
    readSync(fd, b, 0, 8, l1);
    writeSync(fd, b, 0, 8, l1 + 8); // L1[1] := L1[0], COPIED kept
  } finally {
    closeSync(fd);
  }
  const img = await openImage({ filename: path, readOnly: false, format: 'qcow2' });
  t.after(() => img.close());
  const aa = Buffer.alloc(CS, 0xaa);
  assert.ok((await readAt(img.node, span, CS)).equals(aa), 'the second range reads the first table');
  // A new entry in the shared table would appear in both ranges.
  await assert.rejects(
    img.node.write(span + 4 * CS, Buffer.alloc(512, 1)),
    /it is the L2 table of L1 entries 0, 1/,
  );
  await assert.rejects(img.node.write(4 * CS, Buffer.alloc(512, 1)), /it is the L2 table of L1 entries 0, 1/);
  assert.equal(writableInPlace(img.node, 0, 4096), false);
  assert.ok((await readAt(img.node, 4 * CS, CS)).equals(Buffer.alloc(CS)));
});
