/**
 * In-process read benchmark of the block layer: a fully allocated 1 GiB
 * qcow2 (64 KiB clusters) against the same bytes as a raw file, read through
 * the same BlockNode reader, in one run. Not a test.
 *
 *   node --import tsx bench/block-read.ts [--size-mib N] [--dir D] [--rounds R] [--keep]
 *
 * Images are made with qemu-img once per directory and reused (--keep leaves
 * them for the next run). Both files are read once first so that the page
 * cache holds them: the numbers compare the block layer's overhead, not disks.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, rmSync, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { openImage } from '../src/block/open-image.js';
import type { BlockNode } from '../src/block/types.js';

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '1024' },
    dir: { type: 'string', default: join(tmpdir(), 'blkexport-block-bench') },
    rounds: { type: 'string', default: '3' },
    keep: { type: 'boolean', default: false },
  },
});
const SIZE = Number(values['size-mib']) * 1024 * 1024;
const DIR = values.dir!;
const ROUNDS = Number(values.rounds);

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'inherit', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed`);
}

/** Makes raw + qcow2 with the same non-zero pseudo-random content (every cluster allocated). */
function makeImages(): { raw: string; qcow2: string } {
  mkdirSync(DIR, { recursive: true });
  const raw = join(DIR, `disk-${SIZE}.raw`);
  const qcow2 = join(DIR, `disk-${SIZE}.qcow2`);
  if (existsSync(raw) && existsSync(qcow2) && statSync(raw).size === SIZE) return { raw, qcow2 };
  console.log(`making ${SIZE / 1048576} MiB images in ${DIR} ...`);
  const block = Buffer.allocUnsafe(1024 * 1024);
  let x = 0x12345678;
  for (let i = 0; i < block.length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    block.writeInt32LE(x | 1, i);
  }
  const fd = openSync(raw, 'w');
  for (let off = 0; off < SIZE; off += block.length) {
    block.writeUInt32LE(off / block.length, 0); // every MiB differs
    writeSync(fd, block, 0, Math.min(block.length, SIZE - off), off);
  }
  closeSync(fd);
  sh('qemu-img', ['convert', '-O', 'qcow2', '-o', 'cluster_size=64k', raw, qcow2]);
  return { raw, qcow2 };
}

type Workload = { name: string; run(node: BlockNode): Promise<number> };

function sequential(chunk: number, depth: number): Workload {
  return {
    name: `seq read ${chunk >= 1048576 ? `${chunk / 1048576}M` : `${chunk / 1024}k`} QD${depth}`,
    async run(node) {
      const size = node.length();
      const bufs = Array.from({ length: depth }, () => Buffer.allocUnsafe(chunk));
      let next = 0;
      const worker = async (buf: Buffer) => {
        while (next < size) {
          const off = next;
          next += chunk;
          const n = Math.min(chunk, size - off);
          await node.read(off, n === chunk ? buf : buf.subarray(0, n));
        }
      };
      await Promise.all(bufs.map(worker));
      return size;
    },
  };
}

function random(block: number, depth: number, count: number): Workload {
  return {
    name: `rand read ${block / 1024}k QD${depth}`,
    async run(node) {
      const slots = Math.floor(node.length() / block);
      let x = 88172645;
      let done = 0;
      const worker = async () => {
        const buf = Buffer.allocUnsafe(block);
        while (done < count) {
          done++;
          x ^= x << 13;
          x ^= x >>> 17;
          x ^= x << 5;
          await node.read(((x >>> 0) % slots) * block, buf);
        }
      };
      await Promise.all(Array.from({ length: depth }, worker));
      return count * block;
    },
  };
}

const WORKLOADS: Workload[] = [
  sequential(1024 * 1024, 1),
  sequential(128 * 1024, 1),
  sequential(128 * 1024, 4),
  random(4096, 1, 40000),
  random(4096, 16, 80000),
];

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const { raw, qcow2 } = makeImages();
  const r = await openImage({ filename: raw, format: 'raw', readOnly: true });
  const q = await openImage({ filename: qcow2, format: 'qcow2', readOnly: true });
  try {
    // Warm the page cache (and the qcow2 L2 cache) once.
    await sequential(4 * 1024 * 1024, 2).run(r.node);
    await sequential(4 * 1024 * 1024, 2).run(q.node);
    const rows: string[][] = [];
    for (const w of WORKLOADS) {
      const rawRates: number[] = [];
      const qRates: number[] = [];
      for (let i = 0; i < ROUNDS; i++) {
        // Interleave the two (alternating which goes first) so drift hits both alike.
        const pair = [
          [r.node, rawRates],
          [q.node, qRates],
        ] as const;
        for (const [node, out] of i % 2 === 0 ? pair : [...pair].reverse()) {
          const t0 = process.hrtime.bigint();
          const bytes = await w.run(node);
          const s = Number(process.hrtime.bigint() - t0) / 1e9;
          out.push(bytes / s);
        }
      }
      const rr = median(rawRates);
      const qr = median(qRates);
      const unit = w.name.startsWith('rand')
        ? (v: number) => `${(v / 4096 / 1000).toFixed(1)} kIOPS`
        : (v: number) => `${(v / 1e6).toFixed(0)} MB/s`;
      rows.push([w.name, unit(rr), unit(qr), `${(qr / rr).toFixed(2)}x`]);
    }
    const head = ['workload', 'raw', 'qcow2', 'qcow2/raw'];
    const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
    const fmt = (row: string[]) => row.map((c, i) => c.padEnd(widths[i]!)).join('  ');
    console.log(
      `\nblock layer, in process, ${SIZE / 1048576} MiB, 64 KiB clusters, median of ${ROUNDS} (node ${process.version})`,
    );
    console.log(fmt(head));
    console.log(widths.map((w) => '-'.repeat(w)).join('  '));
    for (const row of rows) console.log(fmt(row));
  } finally {
    await r.close();
    await q.close();
    if (!values.keep) rmSync(DIR, { recursive: true, force: true });
  }
}

await main();
