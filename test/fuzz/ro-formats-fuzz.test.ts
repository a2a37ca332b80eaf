/**
 * vpc, vdi and qed fuzzing: seeded mutations of qemu-img-made images (header
 * and footer fields set to interesting values, table entries pointed
 * elsewhere, flipped bytes, truncation) for a time budget. Each mutant must
 * be refused with a coded BlkError naming the image, or served: reads either
 * succeed or fail with a coded error, each image within its time bound, in
 * bounded memory. Where both we and `qemu-img convert` accept a small
 * mutant and every read succeeded, the bytes must be QEMU's (the byte
 * oracle). FUZZ_SEED repeats a run; BLKEXPORT_FUZZ_MS sets the budget.
 * Kept apart from the qcow2 fuzzer (its own seeds and mutator).
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import type { ProbedFormat } from '../../src/block/probe.js';
import { BlkError } from '../../src/errors.js';
import { guest } from '../block/ro-formats.js';
import { needTools, qemuImg, run, seededRandom, tempDir } from '../helpers/tools.js';

const BUDGET_MS = Number(process.env.BLKEXPORT_FUZZ_MS ?? 12_000);
const PER_IMAGE_MS = 5000;
const M = 1024 * 1024;
/** At most this many byte-oracle comparisons (each runs qemu-img) per seed image. */
const ORACLE_PER_SEED = 12;

interface Seed {
  name: string;
  format: ProbedFormat;
  bytes: Buffer;
  /** Offsets worth hitting: header fields and table entries (u32/u64 starts). */
  hot: number[];
}

function seeds(dir: string): Seed[] {
  writeFileSync(join(dir, 'base.raw'), guest('random', 2 * M + 4096, 9));
  const out: Seed[] = [];
  const make = (name: string, format: ProbedFormat, args: string[], size = 3 * M) => {
    const src = join(dir, `${name}.src`);
    writeFileSync(src, guest('sparse', size, out.length + 1));
    const img = join(dir, `${name}.seed`);
    qemuImg('convert', '-q', '-f', 'raw', '-O', format, ...args, src, img);
    return img;
  };
  const add = (name: string, format: ProbedFormat, img: string) => {
    const bytes = readFileSync(img);
    out.push({ name, format, bytes, hot: hotOffsets(format, bytes) });
  };
  add('vpc-dynamic', 'vpc', make('vpc-dynamic', 'vpc', ['-o', 'subformat=dynamic']));
  add('vpc-fixed', 'vpc', make('vpc-fixed', 'vpc', ['-o', 'subformat=fixed']));
  add('vdi-dynamic', 'vdi', make('vdi-dynamic', 'vdi', ['-o', 'static=off']));
  add('vdi-static', 'vdi', make('vdi-static', 'vdi', ['-o', 'static=on']));
  add('qed-4k', 'qed', make('qed-4k', 'qed', ['-o', 'cluster_size=4096,table_size=2']));
  add('qed-64k', 'qed', make('qed-64k', 'qed', ['-o', 'cluster_size=65536']));
  const top = join(dir, 'qed-backing.seed');
  qemuImg(
    'create',
    '-q',
    '-f',
    'qed',
    '-o',
    'cluster_size=4096',
    '-b',
    'base.raw',
    '-F',
    'raw',
    top,
    String(3 * M),
  );
  run('qemu-io', ['-f', 'qed', '-c', 'write -P 7 4096 20000', '-c', 'write -z 65536 8192', top]);
  add('qed-backing', 'qed', top);
  return out;
}

/** Header fields and table entries of the seed, found from its own (trusted) layout. */
function hotOffsets(format: ProbedFormat, b: Buffer): number[] {
  const hot: number[] = [];
  const range = (from: number, to: number, step: number) => {
    for (let o = from; o < Math.min(to, b.length); o += step) hot.push(o);
  };
  if (format === 'vpc') {
    const footer = b.toString('latin1', 0, 8) === 'conectix' ? 0 : b.length - 512;
    range(footer, footer + 0x58, 4);
    if (footer === 0) {
      const dyn = Number(b.readBigUInt64BE(0x10));
      range(dyn, dyn + 0x40, 4);
      range(dyn + 0x240, dyn + 0x300, 4);
      const bat = Number(b.readBigUInt64BE(dyn + 0x10));
      range(bat, bat + 64, 4);
    }
  } else if (format === 'vdi') {
    range(0x40, 0x1c8, 4);
    const bmap = b.readUInt32LE(0x154);
    range(bmap, bmap + 64, 4);
  } else {
    range(0, 64, 4);
    const cs = b.readUInt32LE(4);
    const l1 = Number(b.readBigUInt64LE(40));
    range(l1, l1 + 64, 8);
    const l2 = Number(b.readBigUInt64LE(l1));
    if (l2 > 0 && l2 + 64 <= b.length) range(l2, l2 + 256, 8);
    void cs;
  }
  return hot;
}

const INTERESTING = [
  0n,
  1n,
  2n,
  0x7fn,
  0x80n,
  0x1ffn,
  0x200n,
  0xfffn,
  0x1000n,
  0xffffn,
  0x7fffffffn,
  0x80000000n,
  0xfffffffen,
  0xffffffffn,
  1n << 40n,
  (1n << 63n) - 1n,
  (1n << 64n) - 1n,
];

/** One to three mutations of a copy of the seed; returns the bytes and what was done. */
function mutate(s: Seed, seed: number): { bytes: Buffer; steps: string[] } {
  const rand = seededRandom(seed);
  let b = Buffer.from(s.bytes);
  const steps: string[] = [];
  const n = 1 + Math.floor(rand() * 3);
  for (let i = 0; i < n; i++) {
    const r = rand();
    const at = rand() < 0.8 ? s.hot[Math.floor(rand() * s.hot.length)]! : Math.floor(rand() * b.length);
    const le = s.format !== 'vpc';
    if (r < 0.45) {
      let v = INTERESTING[Math.floor(rand() * INTERESTING.length)]!;
      if (rand() < 0.3) v = BigInt(b.length) + BigInt(Math.floor(rand() * 3) - 1) * 512n;
      const width = rand() < 0.5 ? 4 : 8;
      if (at + width > b.length) continue;
      const m = (1n << BigInt(width * 8)) - 1n;
      const x = v & m;
      if (width === 4) le ? b.writeUInt32LE(Number(x), at) : b.writeUInt32BE(Number(x), at);
      else le ? b.writeBigUInt64LE(x, at) : b.writeBigUInt64BE(x, at);
      steps.push(`set ${width}@${at}=${x}`);
    } else if (r < 0.75) {
      b[at] = Math.floor(rand() * 256);
      steps.push(`byte@${at}`);
    } else if (r < 0.9) {
      const len = Math.floor(rand() * b.length);
      b = b.subarray(0, len);
      steps.push(`truncate ${len}`);
    } else {
      const at2 = s.hot[Math.floor(rand() * s.hot.length)]!;
      if (at2 + 8 <= b.length && at + 8 <= b.length) b.copy(b, at2, at, at + 8);
      steps.push(`copy ${at}->${at2}`);
    }
  }
  // vpc footers carry a checksum: fix it half the time so the mutation reaches past it.
  if (s.format === 'vpc' && rand() < 0.5) {
    const at = b.length >= 512 && b.toString('latin1', 0, 8) === 'conectix' ? 0 : b.length - 512;
    if (at >= 0 && b.length >= 512) {
      let sum = 0;
      for (let i = at; i < at + 512; i++) if (i < at + 0x40 || i >= at + 0x44) sum += b[i]!;
      b.writeUInt32BE(~sum >>> 0, at + 0x40);
      steps.push('fix checksum');
    }
  }
  return { bytes: b, steps };
}

function coded(e: unknown, path: string): string | undefined {
  if (!(e instanceof BlkError)) return `not a BlkError: ${String(e)}`;
  if (e.code === 'INTERNAL') return `INTERNAL: ${e.message}`;
  if (e.place.file !== undefined && e.place.file !== path && !e.place.file.endsWith('.raw'))
    return `names ${e.place.file}`;
  return undefined;
}

test('vpc, vdi, qed fuzzing: mutants refused or served with coded errors, bytes as QEMU reads them', {
  timeout: BUDGET_MS + 300_000,
}, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t, 'blkexport-fuzz-');
  const corpus = seeds(dir);
  const start = Number(process.env.FUZZ_SEED ?? (Date.now() % 1_000_000) * 1000);
  const failures: string[] = [];
  const stats = { images: 0, refused: 0, served: 0, readErrors: 0, compared: 0, qemuRefused: 0, peakRss: 0 };
  const oracleLeft = new Map(corpus.map((s) => [s.name, ORACLE_PER_SEED]));
  const t0 = Date.now();
  for (let seed = start; Date.now() - t0 < BUDGET_MS; seed++) {
    const s = corpus[seed % corpus.length]!;
    const { bytes, steps } = mutate(s, seed);
    const path = join(dir, `${s.name}.img`);
    writeFileSync(path, bytes);
    const what = `${s.name} seed ${seed} [${steps.join('; ')}]`;
    const began = Date.now();
    stats.images++;
    let opened: Awaited<ReturnType<typeof openImage>>;
    try {
      opened = await openImage({ filename: path, format: s.format, readOnly: true });
    } catch (e) {
      stats.refused++;
      const bad = coded(e, path);
      if (bad) failures.push(`${what}: open: ${bad}`);
      continue;
    }
    stats.served++;
    let clean = true;
    let whole: Buffer | undefined;
    try {
      const size = opened.node.length();
      const rand = seededRandom(seed ^ 0x5555);
      const readRange = async (off: number, len: number) => {
        const buf = Buffer.alloc(len);
        try {
          await opened.node.read(off, buf);
        } catch (e) {
          clean = false;
          const bad = coded(e, path);
          if (bad) failures.push(`${what}: read ${off}+${len}: ${bad}`);
        }
        try {
          opened.node.mapHostCached?.(off, len);
        } catch (e) {
          failures.push(`${what}: mapHostCached threw ${String(e)}`);
        }
        return buf;
      };
      if (size <= 8 * M) whole = await readRange(0, size);
      else {
        for (let i = 0; i < 24; i++) {
          const off = Math.floor(rand() * size);
          await readRange(off, Math.min(size - off, 1 + Math.floor(rand() * 256 * 1024)));
        }
      }
    } finally {
      await opened.close();
    }
    if (!clean) stats.readErrors++;
    const ms = Date.now() - began;
    if (ms > PER_IMAGE_MS) failures.push(`${what}: took ${ms} ms`);
    stats.peakRss = Math.max(stats.peakRss, process.memoryUsage().rss);
    if (clean && whole && (oracleLeft.get(s.name) ?? 0) > 0) {
      const ref = join(dir, 'ref.raw');
      const q = run('qemu-img', ['convert', '-U', '-f', s.format, '-O', 'raw', path, ref], {
        timeoutMs: 30_000,
      });
      if (q.status !== 0) {
        stats.qemuRefused++;
        continue;
      }
      oracleLeft.set(s.name, oracleLeft.get(s.name)! - 1);
      stats.compared++;
      const want = readFileSync(ref);
      if (!want.equals(whole))
        failures.push(`${what}: bytes differ from qemu-img convert (${want.length} vs ${whole.length})`);
    }
  }
  t.diagnostic(
    `seed ${start}: ${JSON.stringify({ ...stats, peakRss: `${Math.round(stats.peakRss / M)} MiB` })}`,
  );
  assert.deepEqual(failures, []);
  assert.ok(
    stats.refused > 0 && stats.served > 0 && stats.compared > 0,
    'mutants reach open, read and the oracle',
  );
  assert.ok(stats.peakRss < 1536 * M, 'bounded memory');
});
