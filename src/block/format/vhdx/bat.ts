/**
 * The block allocation table: one 64-bit entry per payload block, with a
 * sector bitmap entry after every `chunkRatio` payload entries (the bitmap
 * of that chunk, used by differencing images). An entry's low 3 bits are the
 * block state, bits 20..63 the file offset in MiB.
 *
 * The number of entries follows from the virtual size and block size; it is
 * bounded by the BAT region's length (itself inside the file) and by
 * MAX_BAT_BYTES before anything is allocated. Every present block must lie
 * past the header section, inside the file and clear of the regions and the
 * log; that is checked once at open, so reads trust the table.
 */
import { corrupt, vhdxError } from './errors.js';
import {
  HEADER_SECTION,
  MiB,
  PAYLOAD_FULLY_PRESENT,
  PAYLOAD_PARTIALLY_PRESENT,
  SB_PRESENT,
  SECTOR_BITMAP_BLOCK,
  SECTORS_PER_BITMAP,
} from './layout.js';
import { overlaps, type Region } from './region.js';

/** Largest BAT held in memory (16 M entries: 16 TiB of 1 MiB blocks, 64 TiB of 4 MiB blocks). */
export const MAX_BAT_BYTES = 128 * MiB;

export interface Geometry {
  blockSize: number;
  logicalSectorSize: number;
  /** Virtual size in bytes (the recorded size rounded down to whole logical sectors). */
  size: number;
  /** Payload blocks per sector bitmap block. */
  chunkRatio: number;
  payloadBlocks: number;
  batEntries: number;
  hasParent: boolean;
}

/** Works out the BAT geometry from the metadata (MS-VHDX 2.5: payload and sector bitmap block counts). */
export function geometry(
  blockSize: number,
  logicalSectorSize: number,
  virtualDiskSize: number,
  hasParent: boolean,
): Geometry {
  const size = Math.floor(virtualDiskSize / logicalSectorSize) * logicalSectorSize;
  const chunkRatio = (SECTORS_PER_BITMAP * logicalSectorSize) / blockSize;
  const payloadBlocks = Math.ceil(size / blockSize);
  const bitmapBlocks = Math.ceil(payloadBlocks / chunkRatio);
  const batEntries = hasParent
    ? bitmapBlocks * (chunkRatio + 1)
    : payloadBlocks === 0
      ? 0
      : payloadBlocks + Math.floor((payloadBlocks - 1) / chunkRatio);
  return { blockSize, logicalSectorSize, size, chunkRatio, payloadBlocks, batEntries, hasParent };
}

/** The BAT index of payload block `b`. */
export function payloadIndex(g: Geometry, b: number): number {
  return b + Math.floor(b / g.chunkRatio);
}

/** The BAT index of the sector bitmap entry of the chunk holding payload block `b`. */
export function bitmapIndex(g: Geometry, b: number): number {
  const chunk = Math.floor(b / g.chunkRatio);
  return chunk * (g.chunkRatio + 1) + g.chunkRatio;
}

/** The state (low 3 bits) of BAT entry `i`. */
export function entryState(bat: Buffer, i: number): number {
  return bat[8 * i]! & 7;
}

/** The file offset of BAT entry `i` in bytes (Infinity when beyond 2^53). */
export function entryOffset(bat: Buffer, i: number): number {
  const lo = bat.readUInt32LE(8 * i);
  const hi = bat.readUInt32LE(8 * i + 4);
  const mb = hi * 4096 + (lo >>> 20);
  return mb * MiB <= Number.MAX_SAFE_INTEGER ? mb * MiB : Number.POSITIVE_INFINITY;
}

/** Checks the BAT region can hold the entries and they fit in memory; the bytes to read. */
export function batBytes(g: Geometry, region: Region, file: string): number {
  const bytes = g.batEntries * 8;
  if (bytes > region.length) {
    throw corrupt(
      file,
      'bat',
      `the BAT region (${region.length} bytes) is too small for ${g.batEntries} entries`,
    );
  }
  if (bytes > MAX_BAT_BYTES) {
    throw vhdxError(
      'IMAGE_TOO_LARGE',
      file,
      'bat',
      `a BAT of ${bytes} bytes is larger than the ${MAX_BAT_BYTES} held in memory`,
    );
  }
  return bytes;
}

/**
 * Checks every allocated block the BAT names: past the header section, inside
 * the file (`fileLength`, after log replay) and clear of `taken` (regions, log).
 * A payload block that the virtual size cuts short only needs its used part in
 * the file (QEMU wrote such last blocks once).
 */
export function checkBat(g: Geometry, bat: Buffer, fileLength: number, taken: Region[], file: string): void {
  const check = (i: number, what: string, need: number) => {
    const off = entryOffset(bat, i);
    const field = `bat[${i}]`;
    if (off < HEADER_SECTION) throw corrupt(file, field, `${what} at ${off} lies in the header section`);
    if (off + need > fileLength) {
      throw corrupt(
        file,
        field,
        `${what} [${off}, ${off + need}) points past the end of the file (${fileLength} bytes)`,
      );
    }
    for (const r of taken) {
      if (overlaps(off, need, r.offset, r.length))
        throw corrupt(file, field, `${what} at ${off} overlaps the region at ${r.offset}`);
    }
  };
  for (let b = 0; b < g.payloadBlocks; b++) {
    const i = payloadIndex(g, b);
    const st = entryState(bat, i);
    if (st !== PAYLOAD_FULLY_PRESENT && st !== PAYLOAD_PARTIALLY_PRESENT) continue;
    check(i, `payload block ${b}`, Math.min(g.blockSize, g.size - b * g.blockSize));
  }
  if (!g.hasParent) return; // sector bitmaps mean nothing without a parent
  for (let b = 0; b < g.payloadBlocks; b += g.chunkRatio) {
    const i = bitmapIndex(g, b);
    if (entryState(bat, i) === SB_PRESENT)
      check(i, `sector bitmap of chunk ${b / g.chunkRatio}`, SECTOR_BITMAP_BLOCK);
  }
}
