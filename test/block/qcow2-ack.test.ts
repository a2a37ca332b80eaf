/**
 * Write before acknowledge: when a guest write (write, write-zeroes,
 * discard) resolves, its data and every metadata change that makes it
 * visible are already in the image file (pwritten, maybe not synced), so a
 * SIGKILL of the serving process right after the reply loses nothing the
 * client was told was written.
 *
 * A child process writes through the block layer, several requests in flight,
 * and reports each op on a pipe before it starts and after it resolves; the
 * parent kills it with SIGKILL at a seeded random moment. Then `qemu-img
 * check` must find no corruption (leaks allowed: exit 0 or 3) and every
 * acknowledged op must read back, through `qemu-img convert -O raw` and
 * through our own block layer. Each image takes several kills in a row, so
 * later rounds start from leaky images.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
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
import { convertToRaw, createQcow2, K, M } from './images.js';
import { type AckOp, ackOps, expectedAfterKill } from './qcow2-ack-ops.js';

const CHILD = join(REPO, 'test/block/qcow2-ack-child.ts');
const KILLS_PER_IMAGE = 4;
/** More than a child gets through before its kill. */
const OPS = 20_000;
const INFLIGHT = 8;

interface Config {
  name: string;
  size: number;
  cluster: number;
  opts: Record<string, string>;
  backing?: boolean;
  snapshot?: boolean;
  /** Lazy refcounts: a killed writer leaves the image dirty; our writable open rebuilds it before the check. */
  lazy?: boolean;
}

const CONFIGS: Config[] = [
  { name: '64 KiB clusters', size: 16 * M, cluster: 64 * K, opts: {} },
  { name: '512 B clusters', size: 2 * M, cluster: 512, opts: { cluster_size: '512' } },
  {
    name: 'extended L2, 32 KiB clusters',
    size: 8 * M,
    cluster: 32 * K,
    opts: { cluster_size: '32k', extended_l2: 'on' },
  },
  {
    name: 'lazy refcounts',
    size: 16 * M,
    cluster: 64 * K,
    opts: { lazy_refcounts: 'on' },
    lazy: true,
  },
  {
    name: 'raw backing file, 4 KiB clusters',
    size: 4 * M,
    cluster: 4 * K,
    opts: { cluster_size: '4096' },
    backing: true,
  },
  {
    name: 'internal snapshot, 4 KiB clusters (writes copy)',
    size: 4 * M,
    cluster: 4 * K,
    opts: { cluster_size: '4096' },
    snapshot: true,
  },
];

interface ChildRun {
  started: Set<number>;
  acked: Set<number>;
  /** The ack lines as the child wrote them: index → "kind off len seed". */
  ackLines: Map<number, string>;
  done: boolean;
}

const children = new Set<ChildProcess>();

/** Runs the child and kills it `delayMs` after it is ready (unless it finishes first). */
function runChild(img: string, cfg: Config, seed: number, delayMs: number): Promise<ChildRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', CHILD, img, String(cfg.cluster), String(seed), String(OPS), String(INFLIGHT)],
      { cwd: REPO, stdio: ['ignore', 'ignore', 'pipe', 'pipe'] },
    );
    children.add(child);
    const r: ChildRun = { started: new Set(), acked: new Set(), ackLines: new Map(), done: false };
    let pending = '';
    let err = '';
    let timer: NodeJS.Timeout | undefined;
    (child.stdio[3] as Readable).on('data', (d: Buffer) => {
      pending += d.toString();
      const lines = pending.split('\n');
      pending = lines.pop()!;
      for (const line of lines) {
        const [tag, idx, ...rest] = line.split(' ');
        if (tag === 'R' && timer === undefined) timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
        else if (tag === 'S') r.started.add(Number(idx));
        else if (tag === 'A') {
          r.acked.add(Number(idx));
          r.ackLines.set(Number(idx), rest.join(' '));
        } else if (tag === 'D') r.done = true;
      }
    });
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
    });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      children.delete(child);
      if (timer) clearTimeout(timer);
      if (signal !== 'SIGKILL' && code !== 0) reject(new Error(`child failed (${code}): ${err}`));
      else resolve(r);
    });
  });
}

/** Every byte of `got` outside `unsure` must equal `ref`; names the first acknowledged op that differs. */
function compare(what: string, got: Buffer, exp: ReturnType<typeof expectedAfterKill>, ops: AckOp[]): void {
  let bad = 0;
  let first = -1;
  const badOps = new Set<number>();
  for (let i = 0; i < got.length; i++) {
    if (exp.unsure[i] || got[i] === exp.ref[i]) continue;
    if (first < 0) first = i;
    bad++;
    badOps.add(exp.owner[i]!);
  }
  if (bad === 0) return;
  const o = exp.owner[first]!;
  const op = o >= 0 ? ops[o] : undefined;
  assert.fail(
    `${what}: ${bad} bytes of ${badOps.size} acknowledged ops differ; first at byte ${first}: ${got[first]}, expected ${exp.ref[first]}` +
      (op ? ` (acknowledged op ${o}: ${op.kind} ${op.off}+${op.len})` : ' (base content)'),
  );
}

async function readAll(img: string, size: number): Promise<Buffer> {
  const o = await openImage({ filename: img, readOnly: true });
  try {
    const b = Buffer.alloc(size);
    await o.node.read(0, b);
    return b;
  } finally {
    await o.close();
  }
}

async function ackImage(dir: string, cfg: Config, idx: number): Promise<{ kills: number; acked: number }> {
  const img = join(dir, `ack-${idx}.qcow2`);
  let backing: [string, string] | undefined;
  if (cfg.backing) {
    const b = join(dir, `base-${idx}.raw`);
    writeFileSync(b, randomBytes(seededRandom(idx), cfg.size));
    backing = [b, 'raw'];
  }
  createQcow2(img, cfg.size, cfg.opts, backing);
  if (cfg.snapshot) {
    const f = join(dir, `s-${idx}.bin`);
    writeFileSync(f, randomBytes(seededRandom(99), cfg.size - 8192));
    qemuIo('-f', 'qcow2', '-c', `write -s ${f} 4096 ${cfg.size - 8192}`, img);
    qemuImg('snapshot', '-c', 'snap', img);
  }
  const rand = seededRandom(2000 + idx);
  rand(); // the first draw of a small seed barely depends on it: every image would be killed at the same moment
  let kills = 0;
  let acked = 0;
  for (let k = 0; k < KILLS_PER_IMAGE; k++) {
    const seed = idx * 100 + k + 1;
    const base = readFileSync(convertToRaw(img, join(dir, `before-${idx}.raw`)));
    const delay = 40 + Math.floor(rand() * 500);
    const r = await runChild(img, cfg, seed, delay);
    if (!r.done) kills++;
    acked += r.acked.size;
    const what = `${cfg.name}, round ${k} (seed ${seed}), killed ${delay} ms in after ${r.acked.size} acknowledged ops`;
    const ops = ackOps(cfg.size, cfg.cluster, seed, OPS);
    for (const [i, line] of r.ackLines) {
      const op = ops[i]!;
      assert.equal(line, `${op.kind} ${op.off} ${op.len} ${op.seed}`, `${what}: op ${i} as the child ran it`);
    }
    const exp = expectedAfterKill(base, ops, r.started, r.acked);
    compare(
      `${what}, qemu-img convert`,
      readFileSync(convertToRaw(img, join(dir, `got-${idx}.raw`))),
      exp,
      ops,
    );
    compare(`${what}, our block layer`, await readAll(img, cfg.size), exp, ops);
    if (cfg.lazy) {
      // A dirty lazy-refcount image's stored refcounts may lag: our writable open rebuilds them.
      const o = await openImage({ filename: img, readOnly: false });
      await o.close();
    }
    const c = run('qemu-img', ['check', img]);
    assert.ok(
      c.status === 0 || c.status === 3,
      `${what}: qemu-img check exited ${c.status}: ${c.stdout}${c.stderr}`,
    );
  }
  return { kills, acked };
}

test('SIGKILL right after a write resolves loses nothing that was acknowledged', {
  timeout: 300_000,
}, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  t.after(() => {
    for (const c of children) c.kill('SIGKILL');
  });
  const dir = tempDir(t);
  let kills = 0;
  let acked = 0;
  const failures: string[] = [];
  // Two images at a time (a 2-core machine); every image runs even when another failed.
  for (let i = 0; i < CONFIGS.length; i += 2) {
    const batch = CONFIGS.slice(i, i + 2).map((cfg, j) => ackImage(dir, cfg, i + j));
    for (const r of await Promise.allSettled(batch)) {
      if (r.status === 'rejected') {
        failures.push(r.reason instanceof Error ? r.reason.message : String(r.reason));
        continue;
      }
      kills += r.value.kills;
      acked += r.value.acked;
    }
  }
  t.diagnostic(`${kills} kills, ${acked} acknowledged ops checked`);
  assert.deepEqual(failures, [], failures.join('\n'));
  const rounds = CONFIGS.length * KILLS_PER_IMAGE;
  assert.ok(kills >= rounds - 2, `only ${kills} of ${rounds} runs were killed mid-way`);
});
