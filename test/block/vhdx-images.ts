/**
 * VHDX test images: made by the real qemu-img/qemu-io, and small hand edits
 * of them done here with independent code (reading the region table and BAT
 * by the specification's offsets) for what qemu-img cannot make: differencing
 * images, 4096-byte logical sectors, hostile mutations.
 */
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { crc32c } from '../../src/block/format/vhdx/crc32c.js';
import { qemuImg } from '../helpers/tools.js';

export const K = 1024;
export const M = 1024 * 1024;

/** qemu-img create -f vhdx with -o options; returns the path. */
export function createVhdx(path: string, size: number, opts: Record<string, string> = {}): string {
  const o = Object.entries(opts)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
  qemuImg('create', '-q', '-f', 'vhdx', ...(o ? ['-o', o] : []), path, String(size));
  return path;
}

/** `len` bytes of `path` at `off` (zeroes past its end). */
export function readAt(path: string, off: number, len: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, off);
    return b;
  } finally {
    closeSync(fd);
  }
}

/** Writes `data` into `path` at `off`. */
export function writeAt(path: string, off: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    for (let done = 0; done < data.length; )
      done += writeSync(fd, data, done, data.length - done, off + done);
  } finally {
    closeSync(fd);
  }
}

const GUID_BAT = Buffer.from('6677c22d23f600429d64115e9bfd4a08', 'hex');
const GUID_META = Buffer.from('06a27c8b90479a4bb8fe575f050f886e', 'hex');

/** Where the first region table puts the BAT and the metadata region. */
export function regions(path: string): { bat: number; batLength: number; meta: number } {
  const t = readAt(path, 192 * K, 64 * K);
  const count = t.readUInt32LE(8);
  let bat = -1;
  let batLength = 0;
  let meta = -1;
  for (let i = 0; i < count; i++) {
    const e = 16 + 32 * i;
    const off = Number(t.readBigUInt64LE(e + 16));
    if (t.subarray(e, e + 16).equals(GUID_BAT)) {
      bat = off;
      batLength = t.readUInt32LE(e + 24);
    }
    if (t.subarray(e, e + 16).equals(GUID_META)) meta = off;
  }
  return { bat, batLength, meta };
}

/** BAT entry `i` as [state, file offset]. */
export function batEntry(path: string, i: number): [number, number] {
  const v = readAt(path, regions(path).bat + 8 * i, 8).readBigUInt64LE(0);
  return [Number(v & 7n), Number(v >> 20n) * M];
}

/** Sets BAT entry `i`. */
export function setBatEntry(path: string, i: number, state: number, offset: number): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE((BigInt(offset / M) << 20n) | BigInt(state));
  writeAt(path, regions(path).bat + 8 * i, b);
}

/** Rewrites the CRC-32C of the `len` checksummed bytes at `off` (after a deliberate edit). */
function reseal(path: string, off: number, len: number): void {
  const b = readAt(path, off, len);
  b.writeUInt32LE(0, 4);
  const c = Buffer.alloc(4);
  c.writeUInt32LE(crc32c(b));
  writeAt(path, off + 4, c);
}

/** Rewrites the CRC-32C of the 4 KiB header at `off`. */
export function resealHeader(path: string, off: number): void {
  reseal(path, off, 4 * K);
}

/** Rewrites the CRC-32C of the 64 KiB region table at `off`. */
export function resealRegionTable(path: string, off: number): void {
  reseal(path, off, 64 * K);
}

/** The current header's offset (the valid copy with the larger sequence number; QEMU-made headers are both valid). */
export function currentHeaderOffset(path: string): number {
  const a = readAt(path, 64 * K, 16).readBigUInt64LE(8);
  const b = readAt(path, 128 * K, 16).readBigUInt64LE(8);
  return a > b ? 64 * K : 128 * K;
}

/** The current header's DataWriteGuid as "{XXXXXXXX-...}" text. */
export function dataWriteGuid(path: string): string {
  const g = readAt(path, currentHeaderOffset(path) + 32, 16);
  const h = Buffer.concat([
    Buffer.from(g.subarray(0, 4)).reverse(),
    Buffer.from(g.subarray(4, 6)).reverse(),
    Buffer.from(g.subarray(6, 8)).reverse(),
    g.subarray(8),
  ])
    .toString('hex')
    .toUpperCase();
  return `{${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}}`;
}

const GUID_LOCATOR_ITEM = Buffer.from('2d5fd3a80bb34d45abf7d3d84834ab0c', 'hex');
const GUID_LOCATOR_TYPE = Buffer.from('b7ef4ab09ed1814ab78925b8e9445913', 'hex');

/**
 * Turns a dynamic image made by qemu-img into a differencing one: sets
 * has_parent and appends a parent locator item (key/value pairs, UTF-16LE)
 * to the metadata table. The metadata region carries no checksum.
 */
export function makeDifferencing(path: string, locator: [string, string][]): void {
  const meta = regions(path).meta;
  const table = readAt(path, meta, 64 * K);
  const count = table.readUInt16LE(10);
  // File parameters: the item QEMU writes first; set HasParent (bit 1).
  const fp = table.readUInt32LE(32 + 16);
  const bits = readAt(path, meta + fp + 4, 4).readUInt32LE(0) | 2;
  const b4 = Buffer.alloc(4);
  b4.writeUInt32LE(bits);
  writeAt(path, meta + fp + 4, b4);
  // The locator: header (type GUID, reserved, count), entries, then the strings.
  const strings: Buffer[] = [];
  const entries = Buffer.alloc(12 * locator.length);
  let at = 20 + entries.length;
  locator.forEach(([k, v], i) => {
    const kb = Buffer.from(k, 'utf16le');
    const vb = Buffer.from(v, 'utf16le');
    entries.writeUInt32LE(at, 12 * i);
    entries.writeUInt32LE(at + kb.length, 12 * i + 4);
    entries.writeUInt16LE(kb.length, 12 * i + 8);
    entries.writeUInt16LE(vb.length, 12 * i + 10);
    strings.push(kb, vb);
    at += kb.length + vb.length;
  });
  const head = Buffer.alloc(20);
  GUID_LOCATOR_TYPE.copy(head, 0);
  head.writeUInt16LE(locator.length, 18);
  const item = Buffer.concat([head, entries, ...strings]);
  const itemOff = 128 * K;
  writeAt(path, meta + itemOff, item);
  const e = Buffer.alloc(32);
  GUID_LOCATOR_ITEM.copy(e, 0);
  e.writeUInt32LE(itemOff, 16);
  e.writeUInt32LE(item.length, 20);
  e.writeUInt32LE(4, 24); // IsRequired
  writeAt(path, meta + 32 + 32 * count, e);
  const c = Buffer.alloc(2);
  c.writeUInt16LE(count + 1);
  writeAt(path, meta + 10, c);
}

/** Sets the logical sector size item (QEMU always writes 512). */
export function setLogicalSectorSize(path: string, size: number): void {
  const meta = regions(path).meta;
  const table = readAt(path, meta, 64 * K);
  const want = Buffer.from('1dbf41816fa90947ba47f233a8faab5f', 'hex');
  for (let i = 0; i < table.readUInt16LE(10); i++) {
    const e = 32 + 32 * i;
    if (!table.subarray(e, e + 16).equals(want)) continue;
    const b = Buffer.alloc(4);
    b.writeUInt32LE(size);
    writeAt(path, meta + table.readUInt32LE(e + 16), b);
    return;
  }
  throw new Error('no logical sector size item');
}
