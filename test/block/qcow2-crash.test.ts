/**
 * Crash safety: a child process writes through the block layer and is
 * killed with SIGKILL at seeded moments (mid-write, mid-flush, mid-allocation).
 * After every kill `qemu-img check` must find no corruption (leaks are
 * allowed: exit 0 or 3) and every byte written before the last acknowledged
 * flush must read back as written. The same image takes several kills in a
 * row, so later runs start from leaky images.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import {
  needTools,
  qemuImg,
  qemuIo,
  REPO,
  randomBytes,
  run,
  seededRandom,
  tempDir,
} from '../helpers/tools.js';
import { convertToRaw, createQcow2, M } from './images.js';
import { type CrashOp, crashOps, expectedAfter } from './qcow2-crash-ops.js';

const CHILD = join(REPO, 'test/block/qcow2-crash-child.ts');
const KILLS_PER_IMAGE = 5;
const OPS = 1500;

interface Config {
  name: string;
  opts: Record<string, string>;
  backing?: boolean;
  snapshot?: boolean;
  /** Lazy refcounts: a killed writer leaves the image dirty; the next writable open rebuilds it first. */
  lazy?: boolean;
}

const CONFIGS: Config[] = [
  { name: '512 B clusters', opts: { cluster_size: '512' } },
  { name: '64 KiB clusters', opts: {} },
  { name: 'refcount bits 64, 512 B (table growth)', opts: { cluster_size: '512', refcount_bits: '64' } },
  { name: 'refcount bits 1, 4 KiB', opts: { cluster_size: '4096', refcount_bits: '1' } },
  {
    name: 'extended L2 over a backing file',
    opts: { cluster_size: '32k', extended_l2: 'on' },
    backing: true,
  },
  { name: 'version 2, 4 KiB', opts: { compat: '0.10', cluster_size: '4096' } },
  { name: 'internal snapshot, 4 KiB', opts: { cluster_size: '4096' }, snapshot: true },
  {
    name: 'lazy refcounts (dirty bit, rebuilt on the next writable open)',
    opts: { lazy_refcounts: 'on' },
    lazy: true,
  },
];

/** Runs the child until it is killed after `delayMs` (or finishes); returns the last flushed op index. */
function runChild(img: string, seed: number, delayMs: number): Promise<{ flushed: number; done: boolean }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', CHILD, img, String(seed), String(OPS)], {
      cwd: REPO,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | undefined;
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (timer === undefined && out.includes('R\n'))
        timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
    });
    child.stderr.on('data', (d: Buffer) => {
      err += d.toString();
    });
    child.on('error', reject);
    child.on('close', (codeOrNull, signal) => {
      if (timer) clearTimeout(timer);
      if (signal !== 'SIGKILL' && codeOrNull !== 0)
        return reject(new Error(`child failed (${codeOrNull}): ${err}`));
      let flushed = -1;
      for (const m of out.matchAll(/^F (\d+)$/gm)) flushed = Number(m[1]);
      const done = out.includes('D\n');
      resolve({ flushed: done ? OPS - 1 : flushed, done });
    });
  });
}

async function crashImage(dir: string, cfg: Config, idx: number): Promise<number> {
  const img = join(dir, `crash-${idx}.qcow2`);
  const size = 2 * M;
  let backing: [string, string] | undefined;
  if (cfg.backing) {
    const b = join(dir, `base-${idx}.raw`);
    writeFileSync(b, randomBytes(seededRandom(idx), size));
    backing = [b, 'raw'];
  }
  createQcow2(img, size, cfg.opts, backing);
  if (cfg.snapshot) {
    writeFileSync(join(dir, `s-${idx}.bin`), randomBytes(seededRandom(99), M));
    qemuIo('-f', 'qcow2', '-c', `write -s ${join(dir, `s-${idx}.bin`)} 4096 ${M}`, img);
    qemuImg('snapshot', '-c', 'snap', img);
  }
  const rand = seededRandom(1000 + idx);
  let kills = 0;
  for (let k = 0; k < KILLS_PER_IMAGE; k++) {
    const seed = idx * 100 + k;
    const base = readFileSync(convertToRaw(img, join(dir, `base-${idx}-${k}.raw`)));
    const delay = Math.floor(rand() * 250);
    const { flushed, done } = await runChild(img, seed, delay);
    if (!done) kills++;
    const what = `${cfg.name}, kill ${k} after ${delay} ms (flushed up to op ${flushed})`;
    if (cfg.lazy) {
      // qemu-img check reports a dirty image's refcounts as they are; a writable open rebuilds them.
      const o = await openImage({ filename: img, readOnly: false });
      await o.close();
    }
    const c = run('qemu-img', ['check', img]);
    assert.ok(
      c.status === 0 || c.status === 3,
      `${what}: qemu-img check exited ${c.status}: ${c.stdout}${c.stderr}`,
    );
    const ops: CrashOp[] = crashOps(size, seed, OPS);
    const { ref, unsure } = expectedAfter(base, ops, flushed);
    const got = readFileSync(convertToRaw(img, join(dir, `got-${idx}-${k}.raw`)));
    for (let i = 0; i < size; i++) {
      if (!unsure[i] && got[i] !== ref[i]) assert.fail(`${what}: byte ${i} is ${got[i]}, expected ${ref[i]}`);
    }
  }
  return kills;
}

test('SIGKILL during qcow2 writes never corrupts and never loses flushed data', {
  timeout: 300_000,
}, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  // Two images at a time (a 2-core machine): each config takes KILLS_PER_IMAGE kills in a row.
  let kills = 0;
  for (let i = 0; i < CONFIGS.length; i += 2) {
    const batch = CONFIGS.slice(i, i + 2).map((cfg, j) => crashImage(dir, cfg, i + j));
    for (const n of await Promise.all(batch)) kills += n;
  }
  t.diagnostic(`${kills} kills`);
  assert.ok(kills >= 30, `only ${kills} of the runs were killed mid-way`);
});
