/**
 * Guest → host mapping through the L1 and L2 tables. Entries are decoded and
 * checked here, where they enter (reserved bits, alignment, inside the file,
 * subcluster bitmaps); the read path trusts the extents this produces.
 */
import type { Qcow2State } from './state.js';
import { corruption } from './state.js';

export const DATA = 0;
export const ZERO = 1;
export const UNALLOCATED = 2;
export const COMPRESSED = 3;
export type ExtentKind = typeof DATA | typeof ZERO | typeof UNALLOCATED | typeof COMPRESSED;

/** One guest range with one way of reading it. */
export interface MappedExtent {
  kind: ExtentKind;
  /** Guest bytes covered. */
  length: number;
  /** DATA: host offset of the first byte (in the data file); COMPRESSED: offset of the compressed bytes. */
  host: number;
  /** COMPRESSED: compressed bytes to read (clipped to the file). */
  clen: number;
  /** COMPRESSED: offset of the first byte inside the decompressed cluster. */
  skip: number;
}

const TWO32 = 2 ** 32;

function push(out: MappedExtent[], kind: ExtentKind, length: number, host: number, clen = 0, skip = 0): void {
  const last = out[out.length - 1];
  if (
    last !== undefined &&
    last.kind === kind &&
    kind !== COMPRESSED &&
    (kind !== DATA || last.host + last.length === host)
  ) {
    last.length += length;
    return;
  }
  out.push({ kind, length, host, clen, skip });
}

/** Decodes and checks L1 entry `index`: the L2 table offset, or 0 when the range is unallocated. */
export function l2TableOffset(s: Qcow2State, index: number): number {
  const hi = s.l1.readUInt32BE(index * 8);
  const lo = s.l1.readUInt32BE(index * 8 + 4);
  if ((lo & 0x1ff) !== 0 || (hi & 0x7f000000) !== 0) {
    throw corruption(s, 'l1_entry', `L1 entry ${index} has reserved bits set`);
  }
  const off = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
  if (off === 0) return 0;
  const cs = s.header.clusterSize;
  if (off % cs !== 0)
    throw corruption(s, 'l1_entry', `L1 entry ${index}: L2 table offset ${off} is not cluster-aligned`);
  if (off + cs > s.fileLength) {
    throw corruption(s, 'l1_entry', `L1 entry ${index}: L2 table at ${off} lies beyond the end of the file`);
  }
  for (const [name, start, end] of s.metadata) {
    if (off < end && off + cs > start) {
      throw corruption(s, 'l1_entry', `L1 entry ${index}: L2 table at ${off} overlaps the ${name}`);
    }
  }
  return off;
}

/** Decodes a compressed cluster descriptor into [host offset, compressed length]. */
export function decodeCompressed(hi: number, lo: number, clusterBits: number): [number, number] {
  const x = 62 - (clusterBits - 8);
  const v = (BigInt(hi) << 32n) | BigInt(lo);
  const offset = Number(v & ((1n << BigInt(x)) - 1n));
  const sectors = Number((v >> BigInt(x)) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
  return [offset, sectors * 512 - (offset % 512)];
}

/** Appends the extents mapping guest [offset, offset+length) to `out`, loading L2 tables as needed. */
export async function mapRange(
  s: Qcow2State,
  offset: number,
  length: number,
  out: MappedExtent[],
): Promise<void> {
  const end = offset + length;
  let pos = offset;
  while (pos < end) {
    const l1Index = Math.floor(pos / s.header.l2Coverage);
    const l2Off = l2TableOffset(s, l1Index);
    const table = l2Off === 0 ? undefined : (s.l2Cache.peek(l2Off) ?? (await s.l2Cache.get(l2Off)));
    pos = mapInTable(s, l1Index, table, pos, end, out);
  }
}

/**
 * The same as mapRange without waiting: true when every L2 table needed was
 * cached (the common case, which then costs no promise); false otherwise,
 * with `out` possibly partly filled (the caller clears it and uses mapRange).
 */
export function mapRangeCached(s: Qcow2State, offset: number, length: number, out: MappedExtent[]): boolean {
  const end = offset + length;
  let pos = offset;
  while (pos < end) {
    const l1Index = Math.floor(pos / s.header.l2Coverage);
    const l2Off = l2TableOffset(s, l1Index);
    let table: Buffer | undefined;
    if (l2Off !== 0) {
      table = s.l2Cache.peek(l2Off);
      if (table === undefined) return false;
    }
    pos = mapInTable(s, l1Index, table, pos, end, out);
  }
  return true;
}

/** Maps from `pos` up to `end` or the end of L2 table `l1Index` (undefined table: unallocated); returns where it stopped. */
function mapInTable(
  s: Qcow2State,
  l1Index: number,
  table: Buffer | undefined,
  pos: number,
  end: number,
  out: MappedExtent[],
): number {
  const h = s.header;
  const cs = h.clusterSize;
  const tableEnd = Math.min(end, (l1Index + 1) * h.l2Coverage);
  if (table === undefined) {
    push(out, UNALLOCATED, tableEnd - pos, 0);
    return tableEnd;
  }
  const firstCluster = l1Index * h.l2Entries;
  while (pos < tableEnd) {
    const gc = Math.floor(pos / cs);
    const clusterStart = gc * cs;
    const clusterEnd = Math.min(tableEnd, clusterStart + cs);
    decodeEntry(s, table, gc - firstCluster, gc, pos - clusterStart, clusterEnd - pos, out);
    pos = clusterEnd;
  }
  return tableEnd;
}

// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
function decodeEntry(
  s: Qcow2State,
  table: Buffer,
  index: number,
  guestCluster: number,
  inCluster: number,
  n: number,
  out: MappedExtent[],
): void {
  const h = s.header;
  const cs = h.clusterSize;
  const e = index * h.l2EntryBytes;
  const hi = table.readUInt32BE(e);
  const lo = table.readUInt32BE(e + 4);
  const where = `guest cluster ${guestCluster}`;

  if ((hi & 0x40000000) !== 0) {
    if (s.externalData)
      throw corruption(s, 'l2_entry', `${where}: compressed cluster with an external data file`);
    if (h.extendedL2 && (table.readUInt32BE(e + 8) !== 0 || table.readUInt32BE(e + 12) !== 0)) {
      throw corruption(s, 'l2_entry', `${where}: compressed cluster with a subcluster bitmap`);
    }
    const [host, clen] = decodeCompressed(hi, lo, h.clusterBits);
    // The last compressed cluster may run past the end of the file by less than a sector.
    if (host < h.clusterSize || host >= s.fileLength || host + clen > s.fileLength + 511) {
      throw corruption(
        s,
        'l2_entry',
        `${where}: compressed data at ${host} (+${clen}) lies outside the file`,
      );
    }
    if (clen > 2 * cs) throw corruption(s, 'l2_entry', `${where}: compressed descriptor is too long`);
    push(out, COMPRESSED, n, host, Math.min(clen, s.fileLength - host), inCluster);
    return;
  }
  if ((hi & 0x3f000000) !== 0 || (lo & 0x1fe) !== 0) {
    throw corruption(s, 'l2_entry', `${where}: L2 entry has reserved bits set`);
  }
  const host = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
  const copied = (hi & 0x80000000) !== 0;
  const allocated = host !== 0 || (s.externalData && copied);
  // Offset 0 with COPIED names host cluster 0, legal only in an external data file.
  if (host === 0 && copied && !s.externalData && (h.extendedL2 || (lo & 1) === 0)) {
    throw corruption(s, 'l2_entry', `${where}: data cluster is the header`);
  }
  if (allocated) {
    if (host % cs !== 0)
      throw corruption(s, 'l2_entry', `${where}: host offset ${host} is not cluster-aligned`);
    if (s.externalData && host !== guestCluster * cs) {
      throw corruption(s, 'l2_entry', `${where}: data file offset ${host} differs from the guest offset`);
    }
    if (!s.externalData && host < cs) throw corruption(s, 'l2_entry', `${where}: data cluster is the header`);
  }
  const checkData = (start: number, len: number) => {
    if (start + len > s.dataLength) {
      throw corruption(
        s,
        'l2_entry',
        `${where}: data at ${start} (+${len}) lies beyond the end of the ${s.externalData ? 'data file' : 'file'}`,
      );
    }
  };

  if (!h.extendedL2) {
    if ((lo & 1) !== 0) {
      if (h.version === 2) throw corruption(s, 'l2_entry', `${where}: zero flag in a version 2 image`);
      push(out, ZERO, n, 0);
    } else if (!allocated) {
      push(out, UNALLOCATED, n, 0);
    } else {
      checkData(host + inCluster, n);
      push(out, DATA, n, host + inCluster);
    }
    return;
  }

  // Extended L2: 32 subclusters, bits 0-31 allocated, bits 32-63 read as zero.
  const zeroMask = table.readUInt32BE(e + 8);
  const allocMask = table.readUInt32BE(e + 12);
  if ((zeroMask & allocMask) !== 0) {
    throw corruption(s, 'l2_bitmap', `${where}: a subcluster is both allocated and zero`);
  }
  if (!allocated && allocMask !== 0) {
    throw corruption(s, 'l2_bitmap', `${where}: allocated subclusters in an unallocated cluster`);
  }
  const sub = h.subclusterSize;
  let pos = inCluster;
  const end = inCluster + n;
  while (pos < end) {
    const sc = Math.floor(pos / sub);
    const scEnd = Math.min(end, (sc + 1) * sub);
    const bit = (1 << sc) >>> 0;
    const len = scEnd - pos;
    if ((allocMask & bit) !== 0) {
      checkData(host + pos, len);
      push(out, DATA, len, host + pos);
    } else if ((zeroMask & bit) !== 0) {
      push(out, ZERO, len, 0);
    } else {
      push(out, UNALLOCATED, len, 0);
    }
    pos = scEnd;
  }
}
