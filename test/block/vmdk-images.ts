/**
 * vmdk test images: a raw source with seeded random data at scattered
 * places (crossing grain, grain-table and 2 GiB extent boundaries), zero
 * runs and very compressible runs, converted by the real qemu-img into every
 * subformat; plus the hand-built layouts qemu-img does not write (a stream
 * with the footer grain directory, a descriptor embedded in a sparse header),
 * each made from a qemu-made image and described where it is built.
 */
import { closeSync, openSync, readFileSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { qemuImg, randomBytes, seededRandom } from '../helpers/tools.js';

const K = 1024;
const M = 1024 * K;
const G = 1024 * M;

export interface Region {
  off: number;
  len: number;
}

/** Writes seeded content into a sparse raw file of `size` bytes; returns the written regions. */
export function makeRawSource(path: string, size: number, seed: number): Region[] {
  const rand = seededRandom(seed);
  const regions: Region[] = [];
  const fd = openSync(path, 'w');
  try {
    writeSync(fd, Buffer.alloc(1), 0, 1, size - 1);
    const put = (off: number, len: number) => {
      const o = Math.max(0, Math.min(off, size - 1));
      const n = Math.max(1, Math.min(len, size - o));
      const pick = rand();
      const data = pick < 0.25 ? Buffer.alloc(n, 0x41 + Math.floor(rand() * 20)) : randomBytes(rand, n);
      writeSync(fd, data, 0, n, o);
      regions.push({ off: o, len: n });
    };
    put(0, 70 * K + 5);
    put(size - 200 * K - 3, 200 * K + 3);
    // Around grain-table boundaries (32 MiB with 64 KiB grains) and 2 GiB extent boundaries.
    for (let b = 32 * M; b < size; b += b >= G ? G : 32 * M) put(b - 3000, 140 * K);
    for (let i = 0; i < 14; i++) put(Math.floor(rand() * size), 1 + Math.floor(rand() * 300 * K));
    writeSync(fd, Buffer.alloc(1), 0, 1, size - 1);
  } finally {
    closeSync(fd);
  }
  return regions;
}

/** qemu-img convert -f raw -O vmdk -o OPTIONS. */
export function convertToVmdk(src: string, dst: string, opts: Record<string, string>): void {
  const o = Object.entries(opts)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
  qemuImg('convert', '-f', 'raw', '-O', 'vmdk', ...(o ? ['-o', o] : []), src, dst);
}

/** qemu-img convert -O raw: the oracle. */
export function oracleRaw(image: string, out: string): string {
  qemuImg('convert', '-O', 'raw', image, out);
  return out;
}

const SECTOR = 512;

/**
 * A streamOptimized image laid out as VMware's stream writers do: qemu-img
 * writes the grain directory where its header says (gdOffset = 30 and so
 * on) and never a footer. From such a qemu-made image this sets the first
 * header's gdOffset to GD_AT_END and appends a footer marker (val 1, size
 * 0, type 3), a footer sector (the original header, with the real gdOffset)
 * and an end-of-stream marker (all zero): the reader must take the grain
 * directory from the footer, 1536 bytes before the end.
 */
export function footerStream(qemuStream: string, out: string): void {
  const b = readFileSync(qemuStream);
  if (b.length % SECTOR !== 0) throw new Error('the stream is not a whole number of sectors');
  const header = Buffer.from(b.subarray(0, SECTOR));
  const body = Buffer.from(b);
  body.writeBigUInt64LE(0xffffffffffffffffn, 56);
  const marker = Buffer.alloc(SECTOR);
  marker.writeBigUInt64LE(1n, 0);
  marker.writeUInt32LE(3, 12);
  writeFileSync(out, Buffer.concat([body, marker, header, Buffer.alloc(SECTOR)]));
}

/**
 * A KDMV file that is a descriptor, not an extent: the first sector of a
 * qemu-made sparse header with capacity 0 and the descriptor at sector 1
 * (QEMU's vmdk_open_vmdk4 then opens the descriptor's extents instead).
 */
export function embeddedDescriptor(qemuSparse: string, out: string, descriptor: string): void {
  const header = Buffer.from(readFileSync(qemuSparse).subarray(0, SECTOR));
  header.writeBigUInt64LE(0n, 12); // capacity
  header.writeBigUInt64LE(1n, 28); // descriptorOffset
  header.writeBigUInt64LE(20n, 36); // descriptorSize
  const desc = Buffer.alloc(20 * SECTOR);
  desc.write(descriptor, 'latin1');
  writeFileSync(out, Buffer.concat([header, desc]));
}

/** A descriptor file text with the given createType, extent lines and keys. */
export function descriptorText(createType: string, extents: string[], extra: string[] = []): string {
  return [
    '# Disk DescriptorFile',
    'version=1',
    'CID=12345678',
    'parentCID=ffffffff',
    `createType="${createType}"`,
    ...extra,
    '',
    '# Extent description',
    ...extents,
    '',
    '# The Disk Data Base',
    '#DDB',
    'ddb.adapterType = "ide"',
    '',
  ].join('\n');
}

/** Reads `len` bytes at `off` of a file. */
export function readRange(path: string, off: number, len: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, off);
    return b;
  } finally {
    closeSync(fd);
  }
}

export const sizes = { K, M, G, SECTOR };

/** Patches bytes of a file in place. */
export function patch(path: string, off: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, off);
  } finally {
    closeSync(fd);
  }
}
