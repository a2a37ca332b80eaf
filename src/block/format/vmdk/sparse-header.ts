/**
 * The header of a hosted sparse extent ("KDMV", versions 1 to 3; little
 * endian), and the footer copy of it that a streamOptimized extent written
 * as a stream keeps in its last sectors (header gdOffset = GD_AT_END). Pure
 * functions: every field is checked against the file length here, before
 * anything is allocated or read from it.
 *
 * Layout (bytes): magic 0, version 4, flags 8, capacity 12, grainSize 20,
 * descriptorOffset 28, descriptorSize 36, numGTEsPerGT 44, rgdOffset 48,
 * gdOffset 56, overHead (first grain) 64, uncleanShutdown 72, the four
 * newline-check bytes 73, compressAlgorithm 77. Sizes and offsets count
 * 512-byte sectors.
 */
import { BlkError } from '../../../errors.js';

export const SECTOR = 512;
export const KDMV = 0x564d444b; // "KDMV" read little endian
export const COWD = 0x434f5744; // "COWD" read big endian (vmfsSparse, VMware 3)
export const FLAG_RGD = 1 << 1;
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_MARKER = 1 << 17;
export const COMPRESSION_DEFLATE = 1;
/** gdOffset meaning "the grain directory is found through the footer". */
export const GD_AT_END = 0xffffffffffffffffn;
/** Bytes of footer marker + footer + end-of-stream marker at the end of a stream. */
export const FOOTER_BYTES = 3 * SECTOR;
/** QEMU's bounds: grains of at most 1 GiB, at most 512 entries per grain table, 32 Mi directory entries. */
const MAX_GRAIN_SECTORS = 0x200000;
const MAX_GTES = 512;
const MAX_GD_ENTRIES = 32 * 1024 * 1024;
/** Compressed grains are inflated in memory: bound them to 64 MiB. */
const MAX_COMPRESSED_GRAIN_SECTORS = 0x20000;

const MARKER_EOS = 0;
const MARKER_FOOTER = 3;

export interface SparseHeader {
  version: number;
  flags: number;
  /** Sectors the extent holds. */
  capacity: number;
  /** Sectors per grain. */
  grainSectors: number;
  descriptorOffset: number;
  descriptorSectors: number;
  gtes: number;
  /** Byte offsets (0: none). */
  gdOffset: number;
  rgdOffset: number;
  overhead: number;
  compressed: boolean;
  markers: boolean;
  zeroGrain: boolean;
  /** Entries in the grain directory. */
  gdEntries: number;
  /** True when the header was taken from the footer. */
  fromFooter: boolean;
}

/** The raw fields of a KDMV header at `at` in `buf` (not checked yet). */
interface RawHeader {
  version: number;
  flags: number;
  capacity: bigint;
  granularity: bigint;
  descOffset: bigint;
  descSize: bigint;
  gtes: number;
  rgdOffset: bigint;
  gdOffset: bigint;
  overhead: bigint;
  compressAlgorithm: number;
}

function rawHeader(buf: Buffer, at: number): RawHeader {
  return {
    version: buf.readUInt32LE(at + 4),
    flags: buf.readUInt32LE(at + 8),
    capacity: buf.readBigUInt64LE(at + 12),
    granularity: buf.readBigUInt64LE(at + 20),
    descOffset: buf.readBigUInt64LE(at + 28),
    descSize: buf.readBigUInt64LE(at + 36),
    gtes: buf.readUInt32LE(at + 44),
    rgdOffset: buf.readBigUInt64LE(at + 48),
    gdOffset: buf.readBigUInt64LE(at + 56),
    overhead: buf.readBigUInt64LE(at + 64),
    compressAlgorithm: buf.readUInt16LE(at + 77),
  };
}

/** The first-sector fields that decide how the extent opens: capacity 0 with a descriptor means "a descriptor file in a sparse header". */
export function peekHeader(buf: Buffer): {
  capacity: bigint;
  descOffset: bigint;
  descSize: bigint;
  gdAtEnd: boolean;
} {
  const r = rawHeader(buf, 0);
  return {
    capacity: r.capacity,
    descOffset: r.descOffset,
    descSize: r.descSize,
    gdAtEnd: r.gdOffset === GD_AT_END,
  };
}

/** Checks a footer (the last FOOTER_BYTES of the file, as QEMU reads them) and returns the header inside it. */
export function footerHeader(tail: Buffer, file: string): Buffer {
  const bad = (why: string, field: string) =>
    new BlkError('IMAGE_CORRUPT', `invalid stream footer: ${why}`, { file, field });
  if (tail.length !== FOOTER_BYTES) throw bad('the file is too short for a footer', 'gdOffset');
  if (tail.readUInt32LE(8) !== 0 || tail.readUInt32LE(12) !== MARKER_FOOTER)
    throw bad('no footer marker 1536 bytes before the end', 'footer marker');
  if (tail.readUInt32BE(SECTOR) !== 0x4b444d56) throw bad('the footer has no KDMV magic', 'footer magic');
  const eos = 2 * SECTOR;
  if (
    tail.readBigUInt64LE(eos) !== 0n ||
    tail.readUInt32LE(eos + 8) !== 0 ||
    tail.readUInt32LE(eos + 12) !== MARKER_EOS
  )
    throw bad('no end-of-stream marker in the last sector', 'end-of-stream marker');
  return tail.subarray(SECTOR, 2 * SECTOR);
}

function sectorsToBytes(v: bigint, field: string, file: string, max: number): number {
  if (v > BigInt(Math.floor(max / SECTOR))) {
    throw new BlkError('IMAGE_CORRUPT', `${field} ${v} points past the end of the file`, { file, field });
  }
  return Number(v) * SECTOR;
}

/**
 * Checks the header in `buf` (the first sector, or the footer's copy) for
 * a file of `fileLength` bytes. Refuses what QEMU refuses (version > 3, more
 * than 512 entries per table, grains over 1 GiB, a directory over 32 Mi
 * entries, a file shorter than overHead) and, beyond QEMU, tables that lie
 * past the end of the file and unknown compression algorithms.
 */
export function parseSparseHeader(
  buf: Buffer,
  fileLength: number,
  file: string,
  fromFooter = false,
): SparseHeader {
  const r = rawHeader(buf, 0);
  const invalid = (
    code: 'IMAGE_INVALID' | 'IMAGE_UNSUPPORTED' | 'IMAGE_CORRUPT' | 'IMAGE_TOO_LARGE',
    why: string,
    field: string,
  ) => new BlkError(code, why, { file, field });
  if (r.version > 3)
    throw invalid('IMAGE_UNSUPPORTED', `VMDK version ${r.version} is not supported`, 'version');
  if (r.compressAlgorithm > COMPRESSION_DEFLATE) {
    throw invalid(
      'IMAGE_UNSUPPORTED',
      `compression algorithm ${r.compressAlgorithm} is not supported`,
      'compressAlgorithm',
    );
  }
  if (r.gtes > MAX_GTES)
    throw invalid(
      'IMAGE_INVALID',
      `${r.gtes} grain table entries per table (at most ${MAX_GTES})`,
      'numGTEsPerGT',
    );
  if (r.gtes === 0) throw invalid('IMAGE_INVALID', 'grain tables of 0 entries', 'numGTEsPerGT');
  if (r.granularity === 0n || r.granularity > BigInt(MAX_GRAIN_SECTORS))
    throw invalid(
      'IMAGE_INVALID',
      `grain size of ${r.granularity} sectors (1 to ${MAX_GRAIN_SECTORS})`,
      'grainSize',
    );
  const compressed = r.compressAlgorithm === COMPRESSION_DEFLATE;
  if (compressed && r.granularity > BigInt(MAX_COMPRESSED_GRAIN_SECTORS))
    throw invalid(
      'IMAGE_UNSUPPORTED',
      `compressed grains of ${r.granularity} sectors are too large`,
      'grainSize',
    );
  if (r.capacity > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR)))
    throw invalid('IMAGE_TOO_LARGE', `capacity of ${r.capacity} sectors is too large`, 'capacity');
  const capacity = Number(r.capacity);
  const grainSectors = Number(r.granularity);
  const coverage = r.gtes * grainSectors;
  const gdEntries = Math.ceil(capacity / coverage);
  if (gdEntries > MAX_GD_ENTRIES)
    throw invalid('IMAGE_INVALID', `grain directory of ${gdEntries} entries is too large`, 'capacity');
  if (r.gdOffset === GD_AT_END)
    throw invalid(
      'IMAGE_CORRUPT',
      fromFooter
        ? 'the footer also says "grain directory at the end"'
        : 'gdOffset says "grain directory at the end" in a header that is not a stream footer',
      'gdOffset',
    );
  const fileSectors = Math.floor(fileLength / SECTOR);
  if (r.overhead > BigInt(fileSectors)) {
    throw invalid(
      'IMAGE_CORRUPT',
      `file truncated, expecting at least ${r.overhead * 512n} bytes`,
      'overHead',
    );
  }
  const gdBytes = gdEntries * 4;
  const gdOffset = sectorsToBytes(r.gdOffset, 'gdOffset', file, fileLength);
  if (gdEntries > 0 && (gdOffset === 0 || gdOffset + gdBytes > fileLength))
    throw invalid(
      'IMAGE_CORRUPT',
      `grain directory at ${gdOffset} (${gdBytes} bytes) lies outside the file`,
      'gdOffset',
    );
  let rgdOffset = 0;
  if ((r.flags & FLAG_RGD) !== 0) {
    rgdOffset = sectorsToBytes(r.rgdOffset, 'rgdOffset', file, fileLength);
    if (gdEntries > 0 && rgdOffset + gdBytes > fileLength)
      throw invalid(
        'IMAGE_CORRUPT',
        `redundant grain directory at ${rgdOffset} lies outside the file`,
        'rgdOffset',
      );
  }
  return {
    version: r.version,
    flags: r.flags,
    capacity,
    grainSectors,
    descriptorOffset: r.descOffset <= BigInt(fileSectors) ? Number(r.descOffset) * SECTOR : -1,
    descriptorSectors: r.descSize <= BigInt(fileSectors) ? Number(r.descSize) : -1,
    gtes: r.gtes,
    gdOffset,
    rgdOffset,
    overhead: Number(r.overhead) * SECTOR,
    compressed,
    markers: (r.flags & FLAG_MARKER) !== 0,
    zeroGrain: (r.flags & FLAG_ZERO_GRAIN) !== 0,
    gdEntries,
    fromFooter,
  };
}
