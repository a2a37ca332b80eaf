/**
 * Power-loss workloads: a qcow2 image made by qemu-img (optionally with a
 * backing file, prefilled data, or compressed clusters from
 * `qemu-img convert -c`) and a seeded guest workload run through the
 * recording layer, sequentially, each op logged as a guest marker.
 */
import { readFileSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { checkImage } from '../../../src/block/format/qcow2/check.js';
import { stateOf } from '../../../src/block/format/qcow2/inspect.js';
import { openImage } from '../../../src/block/open-image.js';
import type { BlockNode } from '../../../src/block/types.js';
import { qemuImg, randomBytes, seededRandom } from '../../helpers/tools.js';
import { applyWrites, convertToRaw, createQcow2, K, M, scatteredWrites } from '../images.js';
import type { GuestOp } from './crash-states.js';
import { openRecorded, WriteLog } from './log-writes.js';

export interface Workload {
  name: string;
  /** qemu-img create -o options. */
  opts: Record<string, string>;
  size: number;
  /** A backing file (qcow2, prefilled) under the image. */
  backing?: boolean;
  /** Prefill with qemu-io writes, then `qemu-img convert -c`: every allocated cluster compressed. */
  compressed?: boolean;
  /** Prefill with qemu-io writes (not compressed). */
  prefill?: boolean;
  /** After the prefill, an internal snapshot (`qemu-img snapshot -c`): writes copy shared L2 tables and clusters. */
  snapshot?: boolean;
  /** Guest ops (flushes included). */
  ops: number;
  /** Largest guest write. */
  maxLen: number;
  /** Share of ops that are flushes. */
  flushShare: number;
  zeroes?: boolean;
  discards?: boolean;
  /** Virtual sizes to grow to, at evenly spread moments. */
  grow?: number[];
  /** Writes land only in the first `spread` bytes (more overwrites), default the whole disk. */
  spread?: number;
  /** Random subsets per epoch (sampling). */
  random: number;
  /** What the run must have exercised (powerloss.ts works out what it did). */
  expect?: Feature[];
}

export type Feature = 'L1 table moved' | 'refcount table moved' | 'compressed clusters' | 'dirty states';

/** The workloads of the CI run (sizes keep one state's check to a few milliseconds). */
export const WORKLOADS: Workload[] = [
  {
    name: 'allocating random writes, 64 KiB clusters',
    opts: {},
    size: 2 * M,
    ops: 60,
    maxLen: 100 * K,
    flushShare: 0.2,
    random: 12,
  },
  {
    name: 'overwrites, write-zeroes, discards, 512 B clusters',
    opts: { cluster_size: '512' },
    size: 1 * M,
    prefill: true,
    ops: 60,
    maxLen: 20 * K,
    flushShare: 0.2,
    zeroes: true,
    discards: true,
    spread: 256 * K,
    random: 12,
  },
  {
    name: 'growth with L1 growth, 512 B clusters',
    opts: { cluster_size: '512' },
    size: 256 * K,
    ops: 50,
    maxLen: 8 * K,
    flushShare: 0.25,
    grow: [1 * M, 3 * M, 5 * M],
    random: 12,
    expect: ['L1 table moved'],
  },
  {
    name: 'refcount-table growth, 512 B clusters, refcount bits 64',
    opts: { cluster_size: '512', refcount_bits: '64' },
    size: 4 * M,
    ops: 45,
    maxLen: 160 * K,
    flushShare: 0.2,
    random: 12,
    expect: ['refcount table moved'],
  },
  {
    name: 'writes into a backing-file overlay, 4 KiB clusters',
    opts: { cluster_size: '4096' },
    size: 2 * M,
    backing: true,
    ops: 50,
    maxLen: 12 * K,
    flushShare: 0.2,
    zeroes: true,
    discards: true,
    random: 12,
  },
  {
    name: 'compressed clusters overwritten, 4 KiB clusters',
    opts: { cluster_size: '4096' },
    size: 1 * M,
    compressed: true,
    ops: 50,
    maxLen: 10 * K,
    flushShare: 0.2,
    zeroes: true,
    discards: true,
    random: 12,
    expect: ['compressed clusters'],
  },
  {
    name: 'extended L2 subclusters over a backing file, 32 KiB clusters',
    opts: { cluster_size: '32k', extended_l2: 'on' },
    size: 2 * M,
    backing: true,
    ops: 50,
    maxLen: 6 * K,
    flushShare: 0.2,
    zeroes: true,
    discards: true,
    random: 12,
  },
  {
    name: 'internal snapshot (copied L2 tables and clusters), 4 KiB clusters',
    opts: { cluster_size: '4096' },
    size: 2 * M,
    prefill: true,
    snapshot: true,
    ops: 40,
    maxLen: 12 * K,
    flushShare: 0.25,
    zeroes: true,
    discards: true,
    random: 12,
  },
  {
    name: '2 MiB clusters',
    opts: { cluster_size: '2M' },
    size: 8 * M,
    ops: 24,
    maxLen: 64 * K,
    flushShare: 0.25,
    zeroes: true,
    random: 9,
  },
  {
    name: 'lazy refcounts (dirty bit; rebuilt on the next writable open)',
    opts: { lazy_refcounts: 'on', cluster_size: '4096' },
    size: 2 * M,
    ops: 50,
    maxLen: 40 * K,
    flushShare: 0.2,
    discards: true,
    random: 12,
    expect: ['dirty states'],
  },
];

/** A recorded run: the image before, its guest content before, and the log. */
export interface Recording {
  image: string;
  /** The image file's bytes before the workload. */
  base: Buffer;
  /** The guest disk's content before the workload. */
  initial: Buffer;
  log: WriteLog;
  /** The image file's bytes after the workload closed it (the "everything" state). */
  final: Buffer;
  /** Compressed clusters in the image before the workload. */
  compressedBefore: number;
}

/** Makes the workload's image in `dir` (named image.qcow2, backing base.qcow2). */
export function makeImage(dir: string, w: Workload, seed: number): string {
  const image = join(dir, 'image.qcow2');
  if (w.backing) {
    const base = createQcow2(join(dir, 'base.qcow2'), w.size, { cluster_size: '4096' });
    applyWrites(dir, base, 'qcow2', scatteredWrites(seed + 1, w.size, 4096, 4096 * 512, 24), seed + 1);
    createQcow2(image, w.size, w.opts, ['base.qcow2', 'qcow2']);
    return image;
  }
  const cs = w.opts.cluster_size ?? '65536';
  const csBytes = cs.endsWith('k')
    ? Number(cs.slice(0, -1)) * K
    : cs.endsWith('M')
      ? Number(cs.slice(0, -1)) * M
      : Number(cs);
  createQcow2(image, w.size, w.opts);
  if (w.prefill || w.compressed) {
    applyWrites(
      dir,
      image,
      'qcow2',
      scatteredWrites(seed + 2, w.size, csBytes, csBytes * (csBytes / 8), 30),
      seed + 2,
    );
  }
  if (w.snapshot) qemuImg('snapshot', '-c', 'before', image);
  if (w.compressed) {
    const o = Object.entries(w.opts)
      .map(([k, v]) => `${k}=${v}`)
      .join(',');
    const tmp = join(dir, 'compressed.qcow2');
    qemuImg('convert', '-c', '-O', 'qcow2', ...(o ? ['-o', o] : []), image, tmp);
    renameSync(tmp, image);
  }
  return image;
}

/** A length between 1 and max, skewed towards small and sector-unaligned ones. */
function pickLen(rand: () => number, max: number): number {
  const r = rand();
  if (r < 0.4) return 1 + Math.floor(rand() * Math.min(max, 4096));
  return 1 + Math.floor(rand() * max);
}

/** Runs the workload through the recording layer and returns the recording. */
export async function recordWorkload(dir: string, w: Workload, seed: number): Promise<Recording> {
  const image = makeImage(dir, w, seed);
  const base = readFileSync(image);
  const initial = readFileSync(convertToRaw(image, join(dir, 'initial.raw'), dir));
  const before = await openImage({ filename: image, format: 'qcow2', readOnly: true, allowedRoots: [dir] });
  let compressedBefore: number;
  try {
    compressedBefore = (await checkImage(stateOf(before.node), 'none')).compressedClusters;
  } finally {
    await before.close();
  }
  const log = new WriteLog();
  const rec = await openRecorded(image, log, [dir]);
  const rand = seededRandom(seed);
  try {
    await guestOps(rec.node, log, w, rand);
  } finally {
    await rec.close();
  }
  return { image, base, initial, log, final: readFileSync(image), compressedBefore };
}

async function guestOps(node: BlockNode, log: WriteLog, w: Workload, rand: () => number): Promise<void> {
  const grow = [...(w.grow ?? [])];
  const growEvery = grow.length > 0 ? Math.floor(w.ops / (grow.length + 1)) : 0;
  const run = (op: GuestOp, fn: () => Promise<void>) => log.guest(op, fn);
  for (let i = 0; i < w.ops; i++) {
    if (growEvery > 0 && i > 0 && i % growEvery === 0 && grow.length > 0) {
      const size = grow.shift()!;
      await run({ op: 'resize', size }, () => node.truncate(size));
      continue;
    }
    const size = node.length();
    const span = Math.min(size, w.spread ?? size);
    const len = Math.min(pickLen(rand, w.maxLen), span);
    const off = Math.floor(rand() * (span - len + 1));
    const r = rand();
    if (r < w.flushShare) {
      await run({ op: 'flush' }, () => node.flush());
    } else if (w.zeroes && r < w.flushShare + 0.1) {
      const mayUnmap = rand() < 0.5;
      await run({ op: 'zeroes', offset: off, length: len }, () => node.writeZeroes(off, len, { mayUnmap }));
    } else if (w.discards && r < w.flushShare + 0.18) {
      await run({ op: 'discard', offset: off, length: len }, () => node.discard(off, len));
    } else {
      const data = randomBytes(rand, len);
      await run({ op: 'write', offset: off, data }, () => node.write(off, data));
    }
  }
  await run({ op: 'flush' }, () => node.flush());
}
