/**
 * vmdk fuzzing in CI: seeded mutations of qemu-img-made vmdk images
 * (monolithicSparse, streamOptimized, zeroed_grain, a stream with the footer
 * grain directory) for a fixed time budget: header fields, the embedded
 * descriptor, grain directory and table entries, grain markers and the
 * footer. Each mutant must be refused with a coded BlkError or served (with
 * coded read errors at worst) within the per-image bound, in bounded memory;
 * mutants qemu-img also converts are compared byte for byte with
 * `qemu-img convert -O raw` (a sample: the oracle costs a process each);
 * every compressed grain a mutant maps is inflated by the FUSE workers'
 * decoder too, which must give JavaScript's bytes wherever it accepts.
 * The seed varies per run (FUZZ_SEED to repeat one).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import { isBlkError } from '../../src/errors.js';
import { convertToVmdk, footerStream, makeRawSource } from '../block/vmdk-images.js';
import { needTools, qemuIo, seededRandom, tempDir } from '../helpers/tools.js';
import { compareInflate } from './qcow2-check.js';

/** Compressed grains both decoders inflated (the workers' and JavaScript's). */
const counts = { inflateCompared: 0 };

const BUDGET_MS = Number(process.env.BLKEXPORT_FUZZ_MS ?? 20_000) / 2;
const PER_IMAGE_MS = 5000;
const MAX_RSS = 1536 * 1024 * 1024;
const READ_WHOLE = 16 * 1024 * 1024;

interface Seed {
  name: string;
  bytes: Buffer;
  /** Offsets worth hitting: grain directory, first grain table, first grain, footer. */
  hot: number[];
}

function makeSeeds(dir: string): Seed[] {
  const src = join(dir, 'src.raw');
  makeRawSource(src, 1024 * 1024 + 512, 99);
  const out: Seed[] = [];
  const add = (name: string, path: string) => {
    const bytes = readFileSync(path);
    const gdSector = bytes.readBigUInt64LE(56);
    const gd =
      gdSector === 0xffffffffffffffffn
        ? Number(bytes.readBigUInt64LE(bytes.length - 1024 + 56)) * 512
        : Number(gdSector) * 512;
    const gt = bytes.readUInt32LE(gd) * 512;
    const grain = bytes.readUInt32LE(gt) * 512;
    out.push({ name, bytes, hot: [0, 512, gd, gt, grain, bytes.length - 1536, bytes.length - 1024] });
  };
  for (const sf of ['monolithicSparse', 'streamOptimized']) {
    const p = join(dir, `${sf}.vmdk`);
    convertToVmdk(src, p, { subformat: sf });
    add(sf, p);
  }
  const z = join(dir, 'zeroed.vmdk');
  convertToVmdk(src, z, { zeroed_grain: 'on' });
  qemuIo('-f', 'vmdk', '-c', 'write -z 0 64k', '-c', 'write -z 512k 128k', z);
  add('zeroed_grain', z);
  const f = join(dir, 'footer.vmdk');
  footerStream(join(dir, 'streamOptimized.vmdk'), f);
  add('footer stream', f);
  return out;
}

const INTERESTING = [
  0n,
  1n,
  2n,
  3n,
  0x7fn,
  0x80n,
  0x200n,
  0xffffn,
  0x7fffffffn,
  0xffffffffn,
  1n << 40n,
  (1n << 64n) - 1n,
];
/** Header fields: [offset, width]. */
const FIELDS: [number, 4 | 8 | 2][] = [
  [4, 4],
  [8, 4],
  [12, 8],
  [20, 8],
  [28, 8],
  [36, 8],
  [44, 4],
  [48, 8],
  [56, 8],
  [64, 8],
  [77, 2],
];

function mutate(seed: Seed, rand: () => number): { bytes: Buffer; steps: string[] } {
  const b = Buffer.from(seed.bytes);
  const steps: string[] = [];
  const n = 1 + Math.floor(rand() * 4);
  for (let i = 0; i < n; i++) {
    if (seed.name.includes('stream') && rand() < 0.15) {
      // The first grain's marker length, near the truth (cutting the stream or running past it) or wild.
      const at = seed.hot[4]! + 8;
      const size = b.readUInt32LE(at);
      const v = [0, 1, size - 1, size - 9, size + 1, size + 600, 0xffffffff][Math.floor(rand() * 7)]!;
      b.writeUInt32LE(v >>> 0, at);
      steps.push(`marker length ${at} = ${v >>> 0}`);
      continue;
    }
    const pick = rand();
    if (pick < 0.35) {
      const [off, w] = FIELDS[Math.floor(rand() * FIELDS.length)]!;
      const base = rand() < 0.3 && seed.name === 'footer stream' ? b.length - 1024 : 0;
      let v = INTERESTING[Math.floor(rand() * INTERESTING.length)]!;
      if (rand() < 0.3) v = BigInt(Math.floor(rand() * (b.length / 512 + 4)));
      if (w === 2) b.writeUInt16LE(Number(v & 0xffffn), base + off);
      else if (w === 4) b.writeUInt32LE(Number(v & 0xffffffffn), base + off);
      else b.writeBigUInt64LE(v & ((1n << 64n) - 1n), base + off);
      steps.push(`field ${base + off} = ${v}`);
    } else if (pick < 0.75) {
      const hot = seed.hot[Math.floor(rand() * seed.hot.length)]!;
      const at = Math.max(0, Math.min(b.length - 4, hot + 4 * Math.floor(rand() * 64)));
      const v =
        rand() < 0.5
          ? Number(INTERESTING[Math.floor(rand() * 10)]!)
          : Math.floor(rand() * (b.length / 512 + 8));
      b.writeUInt32LE(v >>> 0, at);
      steps.push(`u32 ${at} = ${v}`);
    } else if (pick < 0.9) {
      // The embedded descriptor: CIDs, parent name, extent lines.
      const at = 512 + Math.floor(rand() * 400);
      b[at] = [0x30, 0x22, 0x0a, 0x3d, 0x00, 0x66, 0x20][Math.floor(rand() * 7)]!;
      steps.push(`descriptor byte ${at} = ${b[at]}`);
    } else {
      const at = Math.floor(rand() * b.length);
      b[at] = b[at]! ^ (1 << Math.floor(rand() * 8));
      steps.push(`flip ${at}`);
    }
  }
  return { bytes: b, steps };
}

type Outcome =
  | { kind: 'refused' | 'served' | 'read-errors'; code?: string; raw?: Buffer }
  | { kind: 'failure'; reason: string };

async function exercise(path: string, rand: () => number): Promise<Outcome> {
  let img: Awaited<ReturnType<typeof openImage>>;
  try {
    img = await openImage({ filename: path, format: 'vmdk', readOnly: true, locking: 'off' });
  } catch (e) {
    return isBlkError(e)
      ? { kind: 'refused', code: e.code }
      : { kind: 'failure', reason: `open: ${(e as Error).stack}` };
  }
  try {
    const size = img.node.length();
    const whole = size <= READ_WHOLE;
    const raw = whole ? Buffer.alloc(size) : undefined;
    let errors = 0;
    let code: string | undefined;
    const read = async (off: number, buf: Buffer) => {
      try {
        await img.node.read(off, buf);
      } catch (e) {
        if (!isBlkError(e)) throw e;
        errors++;
        code = e.code;
      }
    };
    if (raw)
      for (let off = 0; off < size; off += 256 * 1024)
        await read(off, raw.subarray(off, Math.min(size, off + 256 * 1024)));
    else
      for (let i = 0; i < 64; i++) {
        const off = Math.floor(rand() * Math.max(1, size - 65536));
        await read(off, Buffer.alloc(Math.min(65536, size - off)));
      }
    // The workers' grain decoder on every compressed grain mapped: never accepting what JavaScript refuses.
    const bad = await compareInflate(img.node, 0, Math.min(size, 8 * 1024 * 1024) || 1, counts, new Set());
    if (bad) return { kind: 'failure', reason: bad };
    if (errors > 0) return { kind: 'read-errors', code };
    return raw ? { kind: 'served', raw } : { kind: 'served' };
  } catch (e) {
    return { kind: 'failure', reason: `read: ${(e as Error).stack}` };
  } finally {
    await img.close();
  }
}

test('vmdk fuzzing: mutated qemu-img images refused or served with coded errors, and byte-identical to qemu-img where both read', {
  timeout: BUDGET_MS + 120_000,
}, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t, 'blkexport-vmdk-fuzz-');
  const seeds = makeSeeds(dir);
  const seed = Number(process.env.FUZZ_SEED ?? Date.now() % 1_000_000);
  const rand = seededRandom(seed);
  const stats = { images: 0, refused: 0, served: 0, readErrors: 0, oracle: 0, slowest: 0, peakRss: 0 };
  const codes: Record<string, number> = {};
  const failures: string[] = [];
  const start = Date.now();
  const path = join(dir, 'mutant.vmdk');
  while (Date.now() - start < BUDGET_MS) {
    const s = seeds[stats.images % seeds.length]!;
    const { bytes, steps } = mutate(s, rand);
    writeFileSync(path, bytes);
    const t0 = Date.now();
    const o = await exercise(path, rand);
    const took = Date.now() - t0;
    stats.slowest = Math.max(stats.slowest, took);
    stats.peakRss = Math.max(stats.peakRss, process.memoryUsage().rss);
    stats.images++;
    const where = `${s.name} seed ${seed} image ${stats.images} [${steps.join('; ')}]`;
    if (took > PER_IMAGE_MS) failures.push(`${where}: took ${took} ms`);
    if (o.kind === 'failure') {
      failures.push(`${where}: ${o.reason}`);
      continue;
    }
    if (o.code) codes[o.code] = (codes[o.code] ?? 0) + 1;
    if (o.kind === 'refused') stats.refused++;
    else if (o.kind === 'read-errors') stats.readErrors++;
    else stats.served++;
    // The byte oracle on a sample of what we serve whole: where qemu-img converts it too, the bytes agree.
    if (o.kind === 'served' && o.raw && stats.served % 6 === 1) {
      const out = join(dir, 'oracle.raw');
      const r = spawnSync('qemu-img', ['convert', '-U', '-f', 'vmdk', '-O', 'raw', path, out], {
        timeout: 30_000,
      });
      if (r.status === 0) {
        stats.oracle++;
        if (!readFileSync(out).equals(o.raw)) failures.push(`${where}: reads differ from qemu-img convert`);
      }
    }
  }
  t.diagnostic(
    `seed ${seed}: ${stats.images} images (${stats.refused} refused, ${stats.served} served, ${stats.readErrors} with read errors, ` +
      `${stats.oracle} compared with qemu-img, ${counts.inflateCompared} grains also inflated natively), slowest ${stats.slowest} ms, peak RSS ${Math.round(stats.peakRss / 2 ** 20)} MiB, codes ${JSON.stringify(codes)}`,
  );
  assert.deepEqual(failures, []);
  assert.ok(counts.inflateCompared > 0, "mutated compressed grains reach the workers' decoder");
  assert.ok(stats.peakRss < MAX_RSS, `peak RSS ${stats.peakRss}`);
  assert.ok(stats.images >= 30, `only ${stats.images} images`);
  assert.ok(
    stats.refused > 0 && stats.served > 0 && stats.readErrors > 0,
    'mutations reach open and read paths',
  );
  assert.ok(stats.oracle > 0, 'some mutants were compared with qemu-img');
});
