/**
 * L1/L2 entries as the write path sees them: decoded and checked (reserved
 * bits, alignment, the header cluster, subcluster bitmaps) before a write
 * relies on them, and encoded back. Reads use mapping.ts.
 */
import { corruption, type Qcow2State } from './state.js';

const TWO32 = 2 ** 32;
export const COPIED_HI = 0x80000000;
export const COMPRESSED_HI = 0x40000000;
/** All 32 subclusters. */
export const ALL_SUBCLUSTERS = 0xffffffff;

/** One L2 entry, decoded. */
export interface L2Entry {
  compressed: boolean;
  copied: boolean;
  /** Standard clusters: host offset (0 = none); compressed: 0. */
  host: number;
  /** Standard clusters without extended L2: bit 0, reads as zero. */
  zero: boolean;
  /** Extended L2 bitmaps (0 without extended L2). */
  allocMask: number;
  zeroMask: number;
  /** Compressed clusters: the host clusters the compressed bytes touch [first, last]. */
  cfirst: number;
  clast: number;
}

/** Decodes and checks entry `idx` of an L2 table for guest cluster `gc`. */
export function readL2Entry(s: Qcow2State, table: Buffer, idx: number, gc: number): L2Entry {
  const h = s.header;
  const at = idx * h.l2EntryBytes;
  const hi = table.readUInt32BE(at);
  const lo = table.readUInt32BE(at + 4);
  const where = `guest cluster ${gc}`;
  const e: L2Entry = {
    compressed: false,
    copied: false,
    host: 0,
    zero: false,
    allocMask: 0,
    zeroMask: 0,
    cfirst: 0,
    clast: 0,
  };
  if ((hi & COMPRESSED_HI) !== 0) {
    if (h.extendedL2 && (table.readUInt32BE(at + 8) !== 0 || table.readUInt32BE(at + 12) !== 0)) {
      throw corruption(s, 'l2_entry', `${where}: compressed cluster with a subcluster bitmap`);
    }
    const x = 62 - (h.clusterBits - 8);
    const v = (BigInt(hi) << 32n) | BigInt(lo);
    const off = Number(v & ((1n << BigInt(x)) - 1n));
    const sectors = Number((v >> BigInt(x)) & ((1n << BigInt(h.clusterBits - 8)) - 1n)) + 1;
    const start = off - (off % 512);
    e.compressed = true;
    e.cfirst = Math.floor(start / h.clusterSize);
    e.clast = Math.floor((start + sectors * 512 - 1) / h.clusterSize);
    if (e.cfirst === 0) throw corruption(s, 'l2_entry', `${where}: compressed data in the header cluster`);
    return e;
  }
  if ((hi & 0x3f000000) !== 0 || (lo & 0x1fe) !== 0) {
    throw corruption(s, 'l2_entry', `${where}: L2 entry has reserved bits set`);
  }
  e.copied = (hi & COPIED_HI) !== 0;
  e.host = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
  if (e.host % h.clusterSize !== 0) {
    throw corruption(s, 'l2_entry', `${where}: host offset ${e.host} is not cluster-aligned`);
  }
  if (e.host !== 0 && e.host < h.clusterSize)
    throw corruption(s, 'l2_entry', `${where}: data cluster is the header`);
  if (e.host !== 0 && e.host >= s.refcounts.hostEnd) {
    throw corruption(s, 'l2_entry', `${where}: host offset ${e.host} lies beyond the end of the file`);
  }
  if (h.extendedL2) {
    e.zeroMask = table.readUInt32BE(at + 8);
    e.allocMask = table.readUInt32BE(at + 12);
    if ((e.zeroMask & e.allocMask) !== 0) {
      throw corruption(s, 'l2_bitmap', `${where}: a subcluster is both allocated and zero`);
    }
    if (e.host === 0 && e.allocMask !== 0) {
      throw corruption(s, 'l2_bitmap', `${where}: allocated subclusters in an unallocated cluster`);
    }
  } else {
    e.zero = (lo & 1) !== 0;
    if (e.zero && h.version === 2)
      throw corruption(s, 'l2_entry', `${where}: zero flag in a version 2 image`);
  }
  return e;
}

/** Writes a standard L2 entry: host (0 = none), COPIED, the zero flag, and the bitmaps with extended L2. */
export function writeL2Entry(
  s: Qcow2State,
  table: Buffer,
  idx: number,
  host: number,
  copied: boolean,
  zero: boolean,
  allocMask = 0,
  zeroMask = 0,
): void {
  const at = idx * s.header.l2EntryBytes;
  const hi = Math.floor(host / TWO32) | (copied ? COPIED_HI : 0);
  table.writeUInt32BE(hi >>> 0, at);
  table.writeUInt32BE(((host % TWO32) | (zero ? 1 : 0)) >>> 0, at + 4);
  if (s.header.extendedL2) {
    table.writeUInt32BE(zeroMask >>> 0, at + 8);
    table.writeUInt32BE(allocMask >>> 0, at + 12);
  }
}

/** The raw L1 entry `i`: [L2 offset, COPIED]. */
export function readL1Entry(s: Qcow2State, i: number): { off: number; copied: boolean } {
  const hi = s.l1.readUInt32BE(i * 8);
  const lo = s.l1.readUInt32BE(i * 8 + 4);
  return { off: (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0), copied: (hi & COPIED_HI) !== 0 };
}

/** Sets L1 entry `i` in memory and marks it dirty. */
export function writeL1Entry(s: Qcow2State, i: number, off: number, copied: boolean): void {
  s.l1.writeUInt32BE((Math.floor(off / TWO32) | (copied ? COPIED_HI : 0)) >>> 0, i * 8);
  s.l1.writeUInt32BE((off % TWO32) >>> 0, i * 8 + 4);
  s.w!.dirtyL1.add(i);
}

/** The subcluster bits [first, last] as a mask. */
export function subclusterBits(first: number, last: number): number {
  const n = last - first + 1;
  return (n >= 32 ? ALL_SUBCLUSTERS : ((1 << n) - 1) << first) >>> 0;
}
