/**
 * The benchmark's images: identical content as qcow2 (64 KiB clusters, fully
 * allocated) and as raw, plus a zlib-compressed qcow2 of compressible data with
 * its raw twin, and fresh (empty) images for allocating writes.
 */
import { randomFillSync } from 'node:crypto';
import { copyFile, mkdir, open, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { BlkError } from '../src/errors.js';
import { runCommand } from './proc.js';
import type { FormatVariant } from './workloads.js';

/** The same guest disk in the form each server reads: qcow2 for the FUSE exports, raw for the host file. */
export interface ImagePair {
  qcow2: string;
  raw: string;
  /** Format rows: the raw twin converted to the row's read-only format (makeFormatImage). */
  converted?: string;
}

export interface BenchImages {
  /** Fully allocated qcow2 of random data, and the identical raw file: read workloads. */
  allocated: ImagePair;
  /** zlib-compressed qcow2 of half-compressible data, and its raw twin: read workloads. */
  compressed: ImagePair;
  /** A second fully allocated pair that write workloads may overwrite (reads keep theirs pristine). */
  overwrite: ImagePair;
}

const CHUNK = 1024 * 1024;
const CLUSTER = '64k';

async function mustRun(cmd: string, args: string[]): Promise<string> {
  const r = await runCommand(cmd, args, { timeoutMs: 30 * 60_000 });
  if (r.status !== 0) {
    throw new BlkError('IO', `${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr.trim()}`);
  }
  return r.stdout;
}

/** Writes `size` bytes made by `fill` (one 1 MiB chunk at a time) to a new file. */
async function writeData(path: string, size: number, fill: (chunk: Buffer) => void): Promise<void> {
  const fh = await open(path, 'w');
  try {
    const chunk = Buffer.alloc(CHUNK);
    for (let off = 0; off < size; off += CHUNK) {
      fill(chunk);
      const n = Math.min(CHUNK, size - off);
      await fh.write(chunk, 0, n, off);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

const PATTERN = Buffer.from('blkexport benchmark: compressible half of a 4 KiB block. ');

/** Every 4 KiB: 2 KiB random bytes, then 2 KiB of text; zlib brings a 64 KiB cluster to about half. */
function fillCompressible(chunk: Buffer): void {
  randomFillSync(chunk);
  for (let at = 2048; at < chunk.length; at += 4096) {
    for (let i = 0; i < 2048; i += PATTERN.length)
      PATTERN.copy(chunk, at + i, 0, Math.min(PATTERN.length, 2048 - i));
  }
}

async function compare(qcow2: string, raw: string): Promise<void> {
  await mustRun('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', qcow2, raw]);
}

/** Makes every image of the run under `dir` and checks that each qcow2 reads exactly as its raw twin. */
export async function makeImages(
  dir: string,
  size: number,
  log: (msg: string) => void,
): Promise<BenchImages> {
  const allocated = { qcow2: join(dir, 'allocated.qcow2'), raw: join(dir, 'allocated.raw') };
  const compressed = { qcow2: join(dir, 'compressed.qcow2'), raw: join(dir, 'compressed.raw') };
  const overwrite = { qcow2: join(dir, 'overwrite.qcow2'), raw: join(dir, 'overwrite.raw') };

  log(`images: writing ${size / CHUNK} MiB of random data`);
  await writeData(allocated.raw, size, (c) => randomFillSync(c));
  await mustRun('qemu-img', [
    'convert',
    '-f',
    'raw',
    '-O',
    'qcow2',
    '-o',
    `cluster_size=${CLUSTER}`,
    allocated.raw,
    allocated.qcow2,
  ]);
  await copyFile(allocated.raw, overwrite.raw);
  await copyFile(allocated.qcow2, overwrite.qcow2);

  log('images: writing compressible data and a zlib-compressed qcow2');
  await writeData(compressed.raw, size, fillCompressible);
  await mustRun('qemu-img', [
    'convert',
    '-c',
    '-f',
    'raw',
    '-O',
    'qcow2',
    '-o',
    `cluster_size=${CLUSTER},compression_type=zlib`,
    compressed.raw,
    compressed.qcow2,
  ]);

  log('images: checking that each qcow2 equals its raw twin (qemu-img compare)');
  await compare(allocated.qcow2, allocated.raw);
  await compare(compressed.qcow2, compressed.raw);
  const map = JSON.parse(await mustRun('qemu-img', ['check', '--output=json', allocated.qcow2])) as {
    'allocated-clusters': number;
    'total-clusters': number;
  };
  if (map['allocated-clusters'] !== map['total-clusters']) {
    throw new BlkError(
      'INTERNAL',
      `${allocated.qcow2} is not fully allocated (${map['allocated-clusters']}/${map['total-clusters']} clusters)`,
    );
  }
  const c = JSON.parse(await mustRun('qemu-img', ['check', '--output=json', compressed.qcow2])) as {
    'compressed-clusters'?: number;
    'total-clusters': number;
  };
  if ((c['compressed-clusters'] ?? 0) < c['total-clusters'] * 0.9) {
    throw new BlkError(
      'INTERNAL',
      `${compressed.qcow2}: only ${c['compressed-clusters'] ?? 0} of ${c['total-clusters']} clusters are compressed`,
    );
  }
  return { allocated, compressed, overwrite };
}

/** A fresh, empty pair for allocating writes: a new qcow2 (64 KiB clusters) and a sparse raw file. */
export async function makeFreshPair(dir: string, size: number): Promise<ImagePair> {
  const pair = { qcow2: join(dir, 'fresh.qcow2'), raw: join(dir, 'fresh.raw') };
  await removePair(pair);
  await mustRun('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-o',
    `cluster_size=${CLUSTER}`,
    pair.qcow2,
    String(size),
  ]);
  const fh = await open(pair.raw, 'w');
  await fh.truncate(size);
  await fh.close();
  return pair;
}

/** Removes both files of a pair (missing files are fine). */
export async function removePair(pair: ImagePair): Promise<void> {
  await rm(pair.qcow2, { force: true });
  await rm(pair.raw, { force: true });
}

/** The directory a format row's image lives in (with its extent files, for flat vmdk). */
export function formatImageDir(dir: string, v: FormatVariant): string {
  return join(dir, `fmt-${v.name}`);
}

/**
 * The raw twin converted to a format row's image (`disk.<format>` in
 * formatImageDir), checked with qemu-img compare against it and for its
 * virtual size: the exports' sizes are compared with the raw twin's.
 */
export async function makeFormatImage(
  dir: string,
  raw: string,
  v: FormatVariant,
  log: (msg: string) => void,
): Promise<string> {
  await mkdir(formatImageDir(dir, v), { recursive: true });
  const image = join(formatImageDir(dir, v), `disk.${v.format}`);
  log(`images: converting the allocated raw image to ${v.label} (-o ${v.options})`);
  await mustRun('qemu-img', ['convert', '-f', 'raw', '-O', v.format, '-o', v.options, raw, image]);
  await mustRun('qemu-img', ['compare', '-q', '-f', v.format, '-F', 'raw', image, raw]);
  const info = JSON.parse(await mustRun('qemu-img', ['info', '--output=json', '-f', v.format, image])) as {
    'virtual-size': number;
  };
  const rawSize = (await stat(raw)).size;
  if (info['virtual-size'] !== rawSize) {
    throw new BlkError(
      'INTERNAL',
      `${image}: virtual size ${info['virtual-size']}, not the raw image's ${rawSize}`,
    );
  }
  return image;
}
