/**
 * Writable qcow2 through a real FUSE mount: `blkexport mount IMG --writable
 * --daemonize` over the image itself, seeded pwrites/fsyncs/punch-holes from
 * this process (never from the serving one), `blkexport umount`, then
 * `qemu-img check` clean and `qemu-img compare` identical to the reference.
 */
import assert from 'node:assert/strict';
import {
  closeSync,
  fsyncSync,
  openSync,
  readSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { cleanupMountsUnder, mountsUnder } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, randomBytes, run, seededRandom, tempDir } from '../helpers/tools.js';

const M = 1024 * 1024;

function blk(...args: string[]) {
  return run(BIN, args, { timeoutMs: 60_000 });
}

/** Seeded pwrites (1 B – 1 MiB), fsyncs and punched holes on the mounted file, mirrored into `ref`. */
function workload(path: string, ref: Buffer, seed: number, ops: number): void {
  const rand = seededRandom(seed);
  const fd = openSync(path, 'r+');
  try {
    for (let i = 0; i < ops; i++) {
      const r = rand();
      const len = 1 + Math.floor(rand() * (rand() < 0.6 ? 8192 : M));
      const off = Math.floor(rand() * (ref.length - len));
      if (r < 0.1) fsyncSync(fd);
      else if (r < 0.18) {
        const p = run('fallocate', ['-p', '-o', String(off), '-l', String(len), path]);
        assert.equal(p.status, 0, p.stderr);
        ref.fill(0, off, off + len);
      } else {
        const data = randomBytes(rand, len);
        assert.equal(writeSync(fd, data, 0, len, off), len);
        data.copy(ref, off);
      }
    }
    fsyncSync(fd);
    const back = Buffer.alloc(ref.length);
    assert.equal(readSync(fd, back, 0, back.length, 0), back.length);
    assert.ok(back.equals(ref), 'the mounted file reads back what was written');
  } finally {
    closeSync(fd);
  }
}

function assertImage(dir: string, img: string, ref: Buffer): void {
  const c = run('qemu-img', ['check', img]);
  assert.equal(c.status, 0, c.stdout + c.stderr);
  writeFileSync(join(dir, 'ref.raw'), ref);
  const cmp = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, join(dir, 'ref.raw')]);
  assert.equal(cmp.status, 0, cmp.stdout + cmp.stderr);
}

describe('writable qcow2 over FUSE', { concurrency: false }, () => {
  test('fresh image and an image over a backing file, mounted over themselves', (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse', 'fallocate')) return;
    const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
    const base = join(dir, 'base.raw');
    const baseData = randomBytes(seededRandom(3), 12 * M);
    writeFileSync(base, baseData);
    const cases: [string, string[], Buffer][] = [
      ['fresh.qcow2', ['-o', 'cluster_size=4096'], Buffer.alloc(16 * M)],
      ['over.qcow2', ['-b', base, '-F', 'raw'], Buffer.from(baseData)],
    ];
    for (const [name, opts, ref] of cases) {
      const img = join(dir, name);
      qemuImg('create', '-q', '-f', 'qcow2', ...opts, img, String(ref.length));
      const m = blk('mount', img, '--writable', '--daemonize');
      assert.equal(m.status, 0, m.stderr);
      assert.match(m.stdout, /writable/);
      workload(img, ref, name.length, 60);
      const u = blk('umount', img);
      assert.equal(u.status, 0, u.stderr);
      assert.equal(mountsUnder(dir).length, 0);
      assertImage(dir, img, ref);
    }
  });

  test('growable: writes past the end and truncate grow the qcow2', (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
    const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
    const img = join(dir, 'g.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img, '1M');
    const mnt = join(dir, 'mnt');
    writeFileSync(mnt, '');
    assert.equal(blk('mount', img, mnt, '--writable', '--growable', '--daemonize').status, 0);
    const ref = Buffer.alloc(3 * M);
    const data = randomBytes(seededRandom(9), 300 * 1024);
    const fd = openSync(mnt, 'r+');
    writeSync(fd, data, 0, data.length, 2 * M);
    fsyncSync(fd);
    closeSync(fd);
    data.copy(ref, 2 * M);
    truncateSync(mnt, 3 * M);
    assert.equal(statSync(mnt).size, 3 * M);
    assert.equal(blk('umount', mnt).status, 0);
    const info = JSON.parse(qemuImg('info', '--output=json', img)) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], 3 * M);
    assertImage(dir, img, ref);
  });
});
