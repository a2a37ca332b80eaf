/**
 * The qed format driver, read-only: a header (little-endian), an L1 table
 * and L2 tables of `table_size` clusters each, whose u64 entries are cluster
 * offsets: 0 unallocated (the backing file, or zeroes), 1 a zero cluster,
 * anything else a data cluster. Every table and cluster offset is checked
 * as QEMU checks it (cluster-aligned, past the header, inside the file's
 * whole clusters) before it is used; a bad one is IMAGE_CORRUPT naming the
 * entry. L2 tables can be up to 1 GiB (16 clusters of 64 MiB), so they are
 * read and cached in slices of at most 64 KiB, never whole.
 *
 * The need-check bit says the image was not closed cleanly (an allocation
 * may have been cut short). QEMU checks and repairs such an image when it
 * opens it read-write, and opens it unchecked when read-only, since nothing
 * can be made worse. We only read, and open it like QEMU's read-only open:
 * every entry is bounds-checked when it is used, so the worst an unchecked
 * image can give is the stale or leaked data QEMU would show too. `info`
 * reports the dirty flag as qemu-img does for qed: false, whatever the bit.
 *
 * The backing file is followed only when the header says its format is raw
 * (the "no probe" feature): QED records no other format, and backing files
 * are never probed, so any other backing file is refused unless the backing
 * node is given explicitly.
 */
import { BlkError } from '../../errors.js';
import { defineDriver, type OpenContext } from '../driver.js';
import type { BlockNode, ImageInfo } from '../types.js';
import { openNamedBacking, refuseLoop } from './backing-file.js';
import { type Piece, type PieceSource, readAt, readOnlyFormat, readOnlyFormatOps } from './pieces.js';
import { TableCache } from './qcow2/table-cache.js';

const MAGIC = 0x00444551; // "QED\0"
const HEADER_BYTES = 64;
const F_BACKING_FILE = 0x1n;
const F_NEED_CHECK = 0x2n;
const F_BACKING_FORMAT_NO_PROBE = 0x4n;
const KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
const MIN_CLUSTER = 4096;
const MAX_CLUSTER = 64 * 1024 * 1024;
const MAX_TABLE_CLUSTERS = 16;
/** Longest L1 read (the entries that map the virtual size). */
const MAX_L1_BYTES = 32 * 1024 * 1024;
/** Largest slice of an L2 table read at once. */
const L2_SLICE_BYTES = 64 * 1024;
const L2_CACHE_BYTES = 4 * 1024 * 1024;
/** Longest backing file name (QEMU reads it into a PATH_MAX buffer). */
const MAX_NAME = 4095;
const ZERO_CLUSTER = 1;

interface QedState extends PieceSource {
  size: number;
  clusterSize: number;
  /** Entries per table. */
  tableEntries: number;
  /** Bytes one L2 table maps. */
  l2Coverage: number;
  /** Offsets below this are the header. */
  headerBytes: number;
  /** The file's length rounded down to whole clusters: cluster offsets must lie below it. */
  usableEnd: number;
  l1: Buffer;
  l2: TableCache;
  sliceEntries: number;
  features: bigint;
  backingName: string | undefined;
  backingFormat: string | undefined;
}

const isPow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;

async function openQed(ctx: OpenContext): Promise<QedState> {
  const file = ctx.file;
  if (!file) throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver qed needs a file child`);
  const path = file.filename ?? ctx.nodeName;
  if (!ctx.readOnly) throw readOnlyFormat('qed', path);
  refuseLoop(ctx, file, path, 'backing_filename_offset');
  const fail = (
    code: 'IMAGE_INVALID' | 'IMAGE_UNSUPPORTED' | 'IMAGE_CORRUPT' | 'IMAGE_TOO_LARGE',
    msg: string,
    field: string,
  ) => new BlkError(code, msg, { file: path, field });
  const fileLength = file.length();
  if (fileLength < HEADER_BYTES)
    throw fail('IMAGE_INVALID', `file of ${fileLength} bytes has no qed header`, 'header');
  const h = await readAt(file, 0, HEADER_BYTES);
  if (h.readUInt32LE(0) !== MAGIC) throw fail('IMAGE_INVALID', 'no "QED\\0" magic', 'magic');
  const cs = h.readUInt32LE(4);
  if (!isPow2(cs) || cs < MIN_CLUSTER || cs > MAX_CLUSTER) {
    throw fail(
      'IMAGE_INVALID',
      `cluster size ${cs} is not a power of two from 4 KiB to 64 MiB`,
      'cluster_size',
    );
  }
  const tableSize = h.readUInt32LE(8);
  if (!isPow2(tableSize) || tableSize > MAX_TABLE_CLUSTERS) {
    throw fail(
      'IMAGE_INVALID',
      `table size ${tableSize} is not a power of two from 1 to 16 clusters`,
      'table_size',
    );
  }
  const headerSize = h.readUInt32LE(12);
  const features = h.readBigUInt64LE(16);
  if ((features & ~KNOWN_FEATURES) !== 0n) {
    throw fail(
      'IMAGE_UNSUPPORTED',
      `unknown feature bits 0x${(features & ~KNOWN_FEATURES).toString(16)}`,
      'features',
    );
  }
  const l1Offset = h.readBigUInt64LE(40);
  const imageSize = h.readBigUInt64LE(48);
  const tableBytes = tableSize * cs;
  const tableEntries = tableBytes / 8;
  if (imageSize % 512n !== 0n)
    throw fail('IMAGE_INVALID', `image size ${imageSize} is not a multiple of 512`, 'image_size');
  if (imageSize > BigInt(tableEntries) * BigInt(tableEntries) * BigInt(cs)) {
    throw fail('IMAGE_INVALID', `image size ${imageSize} is more than the tables can map`, 'image_size');
  }
  if (imageSize > BigInt(Number.MAX_SAFE_INTEGER))
    throw fail('IMAGE_TOO_LARGE', `image size ${imageSize}`, 'image_size');
  const headerBytes = headerSize * cs;
  if (headerSize < 1 || headerBytes > fileLength) {
    throw fail('IMAGE_CORRUPT', `header of ${headerSize} clusters does not fit in the file`, 'header_size');
  }
  const usableEnd = Math.floor(fileLength / cs) * cs;
  const size = Number(imageSize);
  const l2Coverage = tableEntries * cs;
  const l1Needed = Math.ceil(size / l2Coverage);
  if (l1Needed * 8 > MAX_L1_BYTES) {
    throw fail(
      'IMAGE_UNSUPPORTED',
      `an L1 table of ${l1Needed} entries (at most ${MAX_L1_BYTES / 8} are read)`,
      'image_size',
    );
  }
  if (!tableOk(Number(l1Offset), l1Offset, cs, tableBytes, headerBytes, usableEnd)) {
    throw fail(
      'IMAGE_CORRUPT',
      `L1 table offset ${l1Offset} is not a table inside the file`,
      'l1_table_offset',
    );
  }
  const l1 = await readAt(file, Number(l1Offset), l1Needed * 8);

  const { backingName, backingFormat } = await readBackingName(file, h, features, headerBytes, path);
  const sliceBytes = Math.min(tableBytes, L2_SLICE_BYTES);
  const state: QedState = {
    file,
    path,
    backing: null,
    size,
    clusterSize: cs,
    tableEntries,
    l2Coverage,
    headerBytes,
    usableEnd,
    l1,
    l2: new TableCache(Math.max(L2_CACHE_BYTES, 2 * sliceBytes), (off) => readAt(file, off, sliceBytes)),
    sliceEntries: sliceBytes / 8,
    features,
    backingName,
    backingFormat,
    locate: (offset, length) => locate(state, offset, length),
    locateCached: (offset, length) => locateCached(state, offset, length),
  };
  state.backing = ctx.backing !== undefined ? ctx.backing : await openQedBacking(ctx, state);
  return state;
}

/** The backing file name the header names, and its format when recorded (raw, the "no probe" feature). */
async function readBackingName(
  file: BlockNode,
  h: Buffer,
  features: bigint,
  headerBytes: number,
  path: string,
): Promise<{ backingName?: string; backingFormat?: string }> {
  if ((features & F_BACKING_FILE) === 0n) return {};
  const off = h.readUInt32LE(56);
  const len = h.readUInt32LE(60);
  if (len > MAX_NAME || off + len > headerBytes || off + len > file.length()) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      `backing file name (${len} bytes at ${off}) is not inside the header`,
      {
        file: path,
        field: 'backing_filename_offset',
      },
    );
  }
  const backingName = (await readAt(file, off, len)).toString('utf8');
  return (features & F_BACKING_FORMAT_NO_PROBE) !== 0n
    ? { backingName, backingFormat: 'raw' }
    : { backingName };
}

/** Opens the backing file the image names (only a raw one: other formats are not recorded, and never probed). */
async function openQedBacking(ctx: OpenContext, s: QedState): Promise<BlockNode | null> {
  if (s.backingName === undefined) return null;
  if (s.backingFormat === undefined) {
    throw new BlkError(
      'BACKING_POLICY',
      `backing file '${s.backingName}' has no recorded format (qed records only raw); backing files are never probed (give the backing node explicitly)`,
      { file: s.path, field: 'features' },
    );
  }
  return openNamedBacking(ctx, s.file, s.backingName, s.backingFormat, 'backing_filename_offset');
}

/** QEMU's table check: cluster-aligned, past the header, every cluster of it inside the file's whole clusters. */
function tableOk(
  off: number,
  big: bigint,
  cs: number,
  bytes: number,
  headerBytes: number,
  usableEnd: number,
): boolean {
  return (
    big <= BigInt(Number.MAX_SAFE_INTEGER) && off % cs === 0 && off >= headerBytes && off + bytes <= usableEnd
  );
}

function clusterOk(s: QedState, off: number): boolean {
  return off % s.clusterSize === 0 && off >= s.headerBytes && off + s.clusterSize <= s.usableEnd;
}

function readU64(b: Buffer, at: number): number {
  const v = b.readBigUInt64LE(at);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? -1 : Number(v);
}

/** The L2 slice holding the entry of guest `offset`: its file offset and the entry's index in it; null when unallocated. */
function l2Slice(s: QedState, offset: number): { at: number; index: number } | null {
  const l1i = Math.floor(offset / s.l2Coverage);
  const l2off = readU64(s.l1, l1i * 8);
  if (l2off === 0) return null;
  if (!tableOk(l2off, BigInt(l2off), s.clusterSize, s.tableEntries * 8, s.headerBytes, s.usableEnd)) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      `L1 entry ${l1i} (${s.l1.readBigUInt64LE(l1i * 8)}) is not an L2 table inside the file`,
      {
        file: s.path,
        field: `l1_table[${l1i}]`,
      },
    );
  }
  const l2i = Math.floor(offset / s.clusterSize) % s.tableEntries;
  const slice = Math.floor(l2i / s.sliceEntries);
  return { at: l2off + slice * s.sliceEntries * 8, index: l2i - slice * s.sliceEntries };
}

/** The piece at `offset` from the slice (runs of alike clusters inside the slice are merged). */
function pieceFrom(s: QedState, offset: number, length: number, slice: Buffer | null, index: number): Piece {
  const cs = s.clusterSize;
  const inCluster = offset % cs;
  const end = Math.min(offset + length, (Math.floor(offset / s.l2Coverage) + 1) * s.l2Coverage);
  if (slice === null) return { length: end - offset, backing: true };
  const entry = (i: number): number => {
    const v = readU64(slice, i * 8);
    if (v > ZERO_CLUSTER && !clusterOk(s, v)) {
      throw new BlkError(
        'IMAGE_CORRUPT',
        `L2 entry for guest offset ${offset - inCluster + (i - index) * cs} is not a cluster inside the file`,
        {
          file: s.path,
          field: 'l2_table',
        },
      );
    }
    return v;
  };
  const first = entry(index);
  let len = cs - inCluster;
  for (let i = index + 1; i < s.sliceEntries && offset + len < end; i++) {
    const v = entry(i);
    const same = first <= ZERO_CLUSTER ? v === first : v === first + (i - index) * cs;
    if (!same) break;
    len += cs;
  }
  len = Math.min(len, end - offset);
  if (first === 0) return { length: len, backing: true };
  if (first === ZERO_CLUSTER) return { length: len, zero: true };
  return { host: first + inCluster, length: len };
}

async function locate(s: QedState, offset: number, length: number): Promise<Piece> {
  const at = l2Slice(s, offset);
  if (at === null) return pieceFrom(s, offset, length, null, 0);
  return pieceFrom(s, offset, length, await s.l2.get(at.at), at.index);
}

function locateCached(s: QedState, offset: number, length: number): Piece | null {
  const at = l2Slice(s, offset);
  if (at === null) return pieceFrom(s, offset, length, null, 0);
  const slice = s.l2.peek(at.at);
  return slice === undefined ? null : pieceFrom(s, offset, length, slice, at.index);
}

function info(s: QedState): ImageInfo {
  const out: ImageInfo = {
    format: 'qed',
    virtualSize: s.size,
    clusterSize: s.clusterSize,
  };
  if (s.backingName !== undefined) out.backingFilename = s.backingName;
  if (s.backingFormat !== undefined) out.backingFormat = s.backingFormat;
  return out;
}

export const qedFormat = defineDriver<QedState>({
  name: 'qed',
  ...readOnlyFormatOps<QedState>('qed'),
  open: openQed,
  async close(s) {
    s.l2.clear();
  },
  length: (s) => s.size,
  imageInfo: info,
});
