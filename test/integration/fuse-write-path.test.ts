/**
 * The write fast path (native-fuse/fast_write.c): writes to granules known
 * writable in place are done by the binding's worker threads with pwrite, the
 * rest by JavaScript. The export is served by this process (so its counters
 * can be read); the client is a child process (write-path-client.py) whose
 * threads write seeded stamps with O_DIRECT, overwriting allocated units and
 * punching holes in them, allocating the neighbouring units, and reading
 * everything meanwhile. After it: the file read back equals the client's
 * model, most writes were served without JavaScript (so this fails when the
 * fast write path is off), and `qemu-img check` / `qemu-img compare` agree.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import { FuseExport } from '../../src/export/fuse/export.js';
import { fuseBackend } from '../../src/export/fuse/mount.js';
import { cleanupMountsUnder } from '../helpers/mounts.js';
import { needTools, qemuImg, run, runOk, tempDir } from '../helpers/tools.js';

const CLIENT = new URL('./write-path-client.py', import.meta.url).pathname;
const M = 1024 * 1024;
const SIZE = 16 * M;
const OPS = 1500;

interface Summary {
  writes: number;
  punches: number;
  reads: number;
  blocksChecked: number;
  errors: string[];
}

/** Runs the client without blocking this process's event loop (which serves the mount). */
function client(args: string[]): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn('python3', [CLIENT, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => {
      out += d.toString();
    });
    p.stderr.on('data', (d: Buffer) => {
      out += d.toString();
    });
    const timer = setTimeout(() => p.kill('SIGKILL'), 120_000);
    p.on('error', reject);
    p.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, out });
    });
  });
}

/** Mounts `img` writable in this process, runs the client, checks it and the counters; returns the model file. */
async function exercise(t: TestContext, dir: string, img: string, format: 'raw' | 'qcow2', seed: number) {
  const mnt = join(dir, 'mnt');
  writeFileSync(mnt, '');
  const o = await openImage({ filename: img, readOnly: false, format });
  let closed = false;
  const closeImage = async () => {
    if (closed) return;
    closed = true;
    await o.close();
  };
  t.after(closeImage);
  const exp = await FuseExport.start(o.node, {
    id: 'w',
    mountpoint: mnt,
    writable: true,
    growable: false,
    allowOther: 'off',
    fsname: 'blkexport-test',
  });
  let stopped = false;
  t.after(async () => {
    if (!stopped) await exp.stop();
  });
  const ref = join(dir, 'model.raw');
  const r = await client([mnt, String(SIZE), String(seed), String(OPS), ref]);
  const stats = exp.nativeStats;
  const total = exp.stats;
  await exp.stop();
  stopped = true;
  await closeImage();
  assert.equal(r.status, 0, r.out);
  const summary = JSON.parse(r.out.trim().split('\n').pop()!) as Summary;
  assert.deepEqual(summary.errors, []);
  assert.ok(summary.reads > 100, `the readers ran alongside (${summary.reads} reads)`);
  assert.ok(stats, 'the libfuse 3 binding has a fast path');
  // Each unit is written ~15 times on average, so once learnt most writes are native.
  assert.ok(
    stats.writes >= summary.writes / 2,
    `writes served without JavaScript: ${stats.writes} of ${summary.writes}`,
  );
  if (format === 'qcow2')
    assert.ok(total.writes - stats.writes > 0, 'the allocating writes went through JavaScript');
  assert.equal(total.writes, summary.writes);
  return ref;
}

describe('the write fast path', { concurrency: false }, () => {
  for (const [name, opts] of [
    ['qcow2, 64 KiB clusters', ['-o', 'cluster_size=65536']],
    [
      'qcow2, extended L2, 128 KiB clusters (granules are subcluster halves)',
      ['-o', 'cluster_size=131072,extended_l2=on'],
    ],
  ] as const) {
    test(`${name}: seeded writes, hole punches and allocating neighbours under readers`, async (t) => {
      if (!needTools(t, 'qemu-img', '/dev/fuse', 'python3')) return;
      assert.equal(fuseBackend(), 'fuse3', 'the libfuse 3 binding is built');
      const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
      const init = join(dir, 'init.raw');
      runOk('python3', [CLIENT, '--init', init, String(SIZE)]);
      const img = join(dir, 'disk.qcow2');
      qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...opts, init, img);
      const ref = await exercise(t, dir, img, 'qcow2', 7);
      const c = run('qemu-img', ['check', img]);
      assert.equal(c.status, 0, c.stdout + c.stderr);
      const cmp = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, ref]);
      assert.equal(cmp.status, 0, cmp.stdout + cmp.stderr);
    });
  }

  test('raw: the same workload, byte-identical', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse', 'python3')) return;
    assert.equal(fuseBackend(), 'fuse3', 'the libfuse 3 binding is built');
    const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
    const img = join(dir, 'disk.raw');
    runOk('python3', [CLIENT, '--init', img, String(SIZE)]);
    const ref = await exercise(t, dir, img, 'raw', 8);
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', img, ref]);
    assert.equal(cmp.status, 0, cmp.stdout + cmp.stderr);
  });
});
