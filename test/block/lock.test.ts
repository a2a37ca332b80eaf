/**
 * QEMU-compatible image locking in the file driver, checked byte by byte in
 * /proc/locks and in both directions against real qemu-img and qemu-io 7.2.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { BlockGraph } from '../../src/block/graph.js';
import { lockBytesOf, lockPermsFor } from '../../src/block/lock.js';
import type { NodeOptions } from '../../src/block/options.js';
import { makePathPolicy } from '../../src/block/path-policy.js';
import { isBlkError } from '../../src/errors.js';
import { needTools, qemuImg, run, tempDir } from '../helpers/tools.js';
import { holdWithQemuIo, lockBytesOn } from '../safety/lock-helpers.js';

const RO = [100, 201, 203];
const RW = [100, 101, 103, 201, 203];

async function openFile(
  t: { after(fn: () => Promise<void>): void },
  dir: string,
  filename: string,
  extra: Partial<NodeOptions> = {},
) {
  const graph = new BlockGraph(await makePathPolicy([dir]));
  t.after(() => graph.close());
  const node = await graph.openNode({ driver: 'file', nodeName: 'f', filename, readOnly: true, ...extra });
  return { graph, node };
}

async function refused(p: Promise<unknown>, re: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(isBlkError(e), `not a BlkError: ${e}`);
    assert.equal(e.code, 'LOCKED');
    assert.match(e.message, re);
    assert.match(e.message, /Is another process using the image \[/);
    return true;
  });
}

function img(t: Parameters<typeof tempDir>[0], fmt = 'qcow2'): { dir: string; path: string } {
  const dir = tempDir(t, 'blkexport-lock-');
  const path = join(dir, `a.${fmt}`);
  qemuImg('create', '-q', '-f', fmt, path, '16M');
  return { dir, path };
}

describe('image locking', { concurrency: false }, () => {
  test('the lock bytes of each mode are those QEMU 7.2 holds for a qcow2 image', () => {
    assert.deepEqual(lockBytesOf(lockPermsFor(true)), RO);
    assert.deepEqual(lockBytesOf(lockPermsFor(false)), RW);
  });

  test('a qcow2 opened by qemu-io holds the same bytes as we do, in each mode', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const { path } = img(t);
    const ro = await holdWithQemuIo(t, path, ['-r', '-f', 'qcow2']);
    assert.deepEqual(lockBytesOn(path), RO);
    await ro.stop();
    const rw = await holdWithQemuIo(t, path, ['-f', 'qcow2']);
    assert.deepEqual(lockBytesOn(path), RW);
    await rw.stop();
  });

  test('read-only, reopen read-write, back to read-only, close: the bytes move with the mode', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const { dir, path } = img(t);
    const { graph, node } = await openFile(t, dir, path);
    assert.deepEqual(lockBytesOn(path), RO);
    await node.reopen({ readOnly: false });
    assert.deepEqual(lockBytesOn(path), RW);
    await node.reopen({ readOnly: true });
    assert.deepEqual(lockBytesOn(path), RO);
    await graph.close();
    assert.deepEqual(lockBytesOn(path), []);
  });

  test('locking: off holds nothing; locking: on holds what auto holds; anything else is refused', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const { dir, path } = img(t);
    const off = await openFile(t, dir, path, { locking: 'off', readOnly: false });
    assert.deepEqual(lockBytesOn(path), []);
    await off.graph.close();
    const on = await openFile(t, dir, path, { locking: 'on' });
    assert.deepEqual(lockBytesOn(path), RO);
    await on.graph.close();
    await assert.rejects(
      openFile(t, dir, path, { locking: 'maybe' as 'on' }),
      (e: unknown) => isBlkError(e) && /locking must be auto, on or off/.test(e.message),
    );
    assert.deepEqual(lockBytesOn(path), []);
  });

  for (const fmt of ['qcow2', 'raw']) {
    test(`${fmt}: while we write, qemu-img info fails as QEMU's own writer makes it fail, qemu-io cannot write`, async (t) => {
      if (!needTools(t, 'qemu-img', 'qemu-io')) return;
      const { dir, path } = img(t, fmt);
      const { node } = await openFile(t, dir, path, { readOnly: false });
      assert.deepEqual(lockBytesOn(path), RW);
      const info = run('qemu-img', ['info', path]);
      if (fmt === 'qcow2') {
        assert.notEqual(info.status, 0);
        assert.match(info.stderr, /Failed to get shared "write" lock/);
        assert.match(info.stderr, /Is another process using the image \[/);
      } else {
        // QEMU's raw driver refuses nobody anything, so its readers share even with a writer.
        assert.equal(info.status, 0, info.stderr);
        assert.equal(run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 512', path]).status, 0);
      }
      assert.equal(run('qemu-img', ['info', '-U', path]).status, 0);
      const io = run('qemu-io', ['-f', fmt, '-c', 'read 0 512', path]);
      assert.notEqual(io.status, 0);
      assert.match(io.stderr, /Failed to get "write" lock/);
      // Read-only again: QEMU's read-only users share with us, its writers do not.
      await node.reopen({ readOnly: true });
      assert.equal(run('qemu-img', ['info', path]).status, 0, 'qemu-img info next to a read-only user');
      assert.equal(run('qemu-io', ['-r', '-f', fmt, '-c', 'read 0 512', path]).status, 0);
      const w = run('qemu-io', ['-f', fmt, '-c', 'write 0 512', path]);
      assert.notEqual(w.status, 0);
      assert.match(w.stderr, /Failed to get "write" lock/);
    });
  }

  test('qemu-io holding the image writable: our open is refused naming the lock', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const { dir, path } = img(t);
    await holdWithQemuIo(t, path, ['-f', 'qcow2']);
    await refused(openFile(t, dir, path), /Failed to get shared "write" lock/);
    await refused(openFile(t, dir, path, { readOnly: false }), /Failed to get "write" lock/);
    assert.deepEqual(lockBytesOn(path), RW, 'a refused open leaves no lock of ours behind');
    // locking: off is the explicit way around it (as QEMU's locking=off).
    const off = await openFile(t, dir, path, { locking: 'off' });
    assert.equal(off.node.readOnly, true);
  });

  test('qemu-io holding the image read-only: we share read-only; a reopen read-write is refused and rolled back', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const { dir, path } = img(t);
    const io = await holdWithQemuIo(t, path, ['-r', '-f', 'qcow2']);
    const { node } = await openFile(t, dir, path);
    const both = [100, 100, 201, 201, 203, 203];
    assert.deepEqual(lockBytesOn(path), both);
    await refused(node.reopen({ readOnly: false }), /Failed to get "write" lock/);
    assert.equal(node.readOnly, true);
    assert.deepEqual(lockBytesOn(path), both, 'exactly the old locks');
    const buf = Buffer.alloc(512);
    await node.read(0, buf);
    assert.equal(buf.readUInt32BE(0), 0x514649fb, 'still reads');
    await io.stop();
    await node.reopen({ readOnly: false });
    assert.deepEqual(lockBytesOn(path), RW);
  });

  test('inside one process: two read-only users share, a writer and a reader exclude each other', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const { dir, path } = img(t);
    const a = await openFile(t, dir, path);
    const b = await openFile(t, dir, path);
    await refused(openFile(t, dir, path, { readOnly: false }), /Failed to get "write" lock/);
    await refused(b.node.reopen({ readOnly: false }), /Failed to get "write" lock/);
    await a.graph.close();
    await b.graph.close();
    const w = await openFile(t, dir, path, { readOnly: false });
    await refused(openFile(t, dir, path), /Failed to get shared "write" lock/);
    await w.graph.close();
  });
});
