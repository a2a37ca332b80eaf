/**
 * Image locking end to end, through `blkexport mount` and the agent, against
 * real qemu-img and qemu-io: our writable export keeps QEMU's writers and
 * consistent readers out; QEMU's writer keeps our writable export out (with a
 * message that names the lock); read-only users share.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { agentDir, startAgent, until } from '../helpers/agent.js';
import { cleanupMountsUnder } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, run, tempDir } from '../helpers/tools.js';
import { holdWithQemuIo, lockBytesOn } from './lock-helpers.js';

const TOOLS = ['qemu-img', 'qemu-io', '/dev/fuse'];

function blk(...args: string[]) {
  return run(BIN, args, { timeoutMs: 60_000 });
}

interface ExportStatus {
  id: string;
  state: string;
  reason: string;
}

describe('image locking through exports', { concurrency: false }, () => {
  // A qcow2 file exported with --format raw is written through the same file node: the lock is
  // the file's, whatever the format.
  for (const format of ['raw', 'qcow2']) {
    test(`blkexport mount --writable --format ${format} on a qcow2 file: qemu-img info fails (works with -U) until umount`, (t) => {
      if (!needTools(t, ...TOOLS)) return;
      const dir = tempDir(t, 'blkexport-lock-', cleanupMountsUnder);
      const img = join(dir, 'a.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
      const mnt = join(dir, 'mnt');
      writeFileSync(mnt, '');
      const m = blk('mount', img, mnt, '--writable', '--format', format, '--daemonize');
      assert.equal(m.status, 0, m.stderr);
      assert.deepEqual(lockBytesOn(img), [100, 101, 103, 201, 203]);
      const info = run('qemu-img', ['info', img]);
      assert.notEqual(info.status, 0);
      assert.match(info.stderr, /Failed to get shared "write" lock\nIs another process using the image \[/);
      assert.equal(run('qemu-img', ['info', '-U', img]).status, 0);
      const io = run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 512', img]);
      assert.match(io.stderr, /Failed to get "write" lock/);
      assert.equal(blk('umount', mnt).status, 0);
      assert.deepEqual(lockBytesOn(img), []);
      assert.equal(run('qemu-img', ['info', img]).status, 0);
      assert.equal(run('qemu-img', ['check', img]).status, 0);
    });
  }

  test('blkexport mount while qemu-io writes the image: refused naming the lock; next to a reader: read-only shares', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = tempDir(t, 'blkexport-lock-', cleanupMountsUnder);
    const img = join(dir, 'a.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    const mnt = join(dir, 'mnt');
    writeFileSync(mnt, '');
    const writer = await holdWithQemuIo(t, img, ['-f', 'qcow2']);
    const w = blk('mount', img, mnt, '--writable', '--daemonize');
    assert.equal(w.status, 1);
    assert.match(
      w.stderr,
      /Failed to get "write" lock\. Is another process using the image \[.*a\.qcow2\]\?/,
    );
    const r = blk('mount', img, mnt, '--daemonize');
    assert.equal(r.status, 1);
    assert.match(r.stderr, /Failed to get shared "write" lock/);
    await writer.stop();

    await holdWithQemuIo(t, img, ['-r', '-f', 'qcow2']);
    const shared = blk('mount', img, mnt, '--daemonize');
    assert.equal(shared.status, 0, shared.stderr);
    assert.equal(run('qemu-img', ['info', img]).status, 0, 'qemu-img info next to two readers');
    assert.equal(blk('umount', mnt).status, 0);
    const w2 = blk('mount', img, mnt, '--writable', '--daemonize');
    assert.equal(w2.status, 1);
    assert.match(w2.stderr, /Failed to get "write" lock/);
  });

  test('blkexport info next to a QEMU writer: refused naming the lock, works with -U (as qemu-img info)', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = tempDir(t, 'blkexport-lock-');
    const img = join(dir, 'a.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    await holdWithQemuIo(t, img, ['-f', 'qcow2']);
    const refused = blk('info', img);
    assert.equal(refused.status, 1);
    assert.match(refused.stderr, /Failed to get shared "write" lock\. Is another process using the image \[/);
    const shared = blk('info', '-U', img, '-o', 'json');
    assert.equal(shared.status, 0, shared.stderr);
    assert.equal(JSON.parse(shared.stdout)['virtual-size'], 8 << 20);
  });

  test('agent: a writable export locks its image; one refused by a QEMU writer is failed, then retried and ready', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const a = join(d.images, 'a.raw');
    const b = join(d.images, 'b.raw');
    qemuImg('create', '-q', '-f', 'raw', a, '8M');
    qemuImg('create', '-q', '-f', 'raw', b, '8M');
    const writer = await holdWithQemuIo(t, b, ['-f', 'raw']);
    const m = (id: string, img: string) =>
      `    - id: ${id}\n      image: ${img}\n      format: raw\n      writable: true\n      mountpoint: ${img}.mnt\n      create-mountpoint: true\n`;
    writeFileSync(
      join(d.manifests, 'locks.yaml'),
      `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: locks\nspec:\n  exports:\n${m('a', a)}${m('b', b)}`,
    );
    const agent = await startAgent(t, d);
    const status = async () =>
      new Map((await agent.get<{ exports: ExportStatus[] }>('/status')).exports.map((e) => [e.id, e]));
    const by = await until('a ready, b failed', async () => {
      const map = await status();
      return map.get('a')?.state === 'ready' && map.get('b')?.state === 'failed' ? map : undefined;
    });
    assert.match(
      by.get('b')!.reason,
      /Failed to get shared "write" lock\. Is another process using the image \[/,
    );
    assert.deepEqual(lockBytesOn(a), [100, 101, 103, 201, 203]);
    const io = run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', a]);
    assert.match(io.stderr, /Failed to get "write" lock/);
    await writer.stop();
    await until(
      'b ready after the writer left',
      async () => (await status()).get('b')?.state === 'ready',
      15_000,
    );
    assert.deepEqual(lockBytesOn(b), [100, 101, 103, 201, 203]);
  });
});
