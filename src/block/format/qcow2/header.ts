/**
 * The qcow2 header: parsed from cluster 0 and validated once, at open. Every
 * offset and size the rest of the driver uses comes from here already
 * checked (alignment, caps, inside the file), so the mapping code trusts it.
 */
import { BlkError } from '../../../errors.js';

export const QCOW2_MAGIC = 0x514649fb;
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** Caps QEMU applies too: an L1 table ≤ 32 MiB, a refcount table ≤ 8 MiB, ≤ 65 536 snapshots. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_BACKING_NAME = 1023;

/** Incompatible feature bits. */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = (1n << 5n) - 1n;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

export type CompressionType = 'zlib' | 'zstd';

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: CompressionType;
  /** Derived geometry. */
  extendedL2: boolean;
  l2EntryBytes: 8 | 16;
  l2Entries: number;
  /** Guest bytes one L2 table maps. */
  l2Coverage: number;
  /** L1 entries needed to map the virtual size. */
  l1Needed: number;
  subclusterSize: number;
}

/** Reads a big-endian u64 that must be a safe JS integer; throws IMAGE_INVALID naming the field otherwise. */
export function readU64(buf: Buffer, at: number, file: string, field: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlkError('IMAGE_INVALID', `${field} ${v} is too large`, { file, field });
  }
  return Number(v);
}

/**
 * Parses and validates the header in `head` (the start of cluster 0, at
 * least 104 bytes or the whole file); `fileLength` bounds every table.
 */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
export function parseHeader(head: Buffer, fileLength: number, file: string): Qcow2Header {
  const invalid = (field: string, msg: string) => new BlkError('IMAGE_INVALID', msg, { file, field });
  if (head.length < V2_HEADER_LENGTH) throw invalid('magic', 'file too short for a qcow2 header');
  if (head.readUInt32BE(0) !== QCOW2_MAGIC) throw invalid('magic', 'not a qcow2 image (bad magic)');
  const version = head.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new BlkError('IMAGE_UNSUPPORTED', `qcow2 version ${version} is not supported`, {
      file,
      field: 'version',
    });
  }
  const clusterBits = head.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw invalid('cluster_bits', `cluster_bits ${clusterBits} is outside 9..21 (512 B .. 2 MiB)`);
  }
  const clusterSize = 2 ** clusterBits;
  const h = {
    version,
    backingFileOffset: readU64(head, 8, file, 'backing_file_offset'),
    backingFileSize: head.readUInt32BE(16),
    clusterBits,
    clusterSize,
    size: readU64(head, 24, file, 'size'),
    cryptMethod: head.readUInt32BE(32),
    l1Size: head.readUInt32BE(36),
    l1TableOffset: readU64(head, 40, file, 'l1_table_offset'),
    refcountTableOffset: readU64(head, 48, file, 'refcount_table_offset'),
    refcountTableClusters: head.readUInt32BE(56),
    nbSnapshots: head.readUInt32BE(60),
    snapshotsOffset: readU64(head, 64, file, 'snapshots_offset'),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 'zlib' as CompressionType,
  };
  if (version === 3) {
    if (head.length < V3_MIN_HEADER_LENGTH) throw invalid('header_length', 'file too short for a v3 header');
    h.incompatible = head.readBigUInt64BE(72);
    h.compatible = head.readBigUInt64BE(80);
    h.autoclear = head.readBigUInt64BE(88);
    h.refcountOrder = head.readUInt32BE(96);
    h.headerLength = head.readUInt32BE(100);
    if (h.headerLength < V3_MIN_HEADER_LENGTH || h.headerLength % 8 !== 0) {
      throw invalid(
        'header_length',
        `header_length ${h.headerLength} is not a multiple of 8 of at least 104`,
      );
    }
    if (h.headerLength > clusterSize) {
      throw invalid(
        'header_length',
        `header_length ${h.headerLength} runs past cluster 0 (${clusterSize} bytes)`,
      );
    }
    if (h.headerLength > head.length) throw invalid('header_length', 'header runs past the end of the file');
    const compressionByte = h.headerLength > 104 ? head.readUInt8(104) : 0;
    const bit = (h.incompatible & INCOMPAT_COMPRESSION) !== 0n;
    if (bit !== (compressionByte !== 0)) {
      throw invalid(
        'compression_type',
        `compression_type ${compressionByte} does not match the compression-type feature bit (${bit ? 'set' : 'clear'})`,
      );
    }
    if (compressionByte > 1) {
      throw new BlkError('IMAGE_UNSUPPORTED', `unknown compression_type ${compressionByte}`, {
        file,
        field: 'compression_type',
      });
    }
    h.compressionType = compressionByte === 1 ? 'zstd' : 'zlib';
  }
  const unknown = h.incompatible & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    throw new BlkError(
      'IMAGE_UNSUPPORTED',
      `unknown incompatible feature bits 0x${unknown.toString(16)}: refusing to open`,
      { file, field: 'incompatible_features' },
    );
  }
  if (h.refcountOrder > 6) throw invalid('refcount_order', `refcount_order ${h.refcountOrder} is above 6`);
  if (h.cryptMethod === 1 || h.cryptMethod === 2) {
    throw new BlkError(
      'IMAGE_ENCRYPTED',
      `encrypted qcow2 images (${h.cryptMethod === 1 ? 'AES' : 'LUKS'}) are not supported`,
      { file, field: 'crypt_method' },
    );
  }
  if (h.cryptMethod !== 0) throw invalid('crypt_method', `unknown crypt_method ${h.cryptMethod}`);

  const extendedL2 = (h.incompatible & INCOMPAT_EXTL2) !== 0n;
  if (extendedL2 && clusterBits < 14) {
    throw invalid('incompatible_features', 'extended L2 entries need clusters of at least 16 KiB');
  }
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntryBytes;
  const l2Coverage = l2Entries * clusterSize;
  const l1Needed = Math.ceil(h.size / l2Coverage);
  if (l1Needed * 8 > MAX_L1_BYTES) {
    throw new BlkError('IMAGE_TOO_LARGE', `virtual size ${h.size} needs an L1 table above 32 MiB`, {
      file,
      field: 'size',
    });
  }
  if (h.l1Size < l1Needed) {
    throw invalid(
      'l1_size',
      `l1_size ${h.l1Size} is too small for virtual size ${h.size} (needs ${l1Needed})`,
    );
  }
  if (h.l1Size * 8 > MAX_L1_BYTES) throw invalid('l1_size', `l1_size ${h.l1Size} exceeds the 32 MiB cap`);

  const checkTable = (field: string, offset: number, bytes: number) => {
    if (offset % clusterSize !== 0) throw invalid(field, `${field} ${offset} is not cluster-aligned`);
    if (bytes > 0 && offset === 0) throw invalid(field, `${field} points at the header cluster`);
    if (offset + bytes > fileLength) {
      throw invalid(
        field,
        `table at ${field} ${offset} (+${bytes}) lies beyond the end of the file (${fileLength})`,
      );
    }
  };
  if (h.l1Size > 0) checkTable('l1_table_offset', h.l1TableOffset, h.l1Size * 8);
  if (h.refcountTableClusters === 0) throw invalid('refcount_table_clusters', 'refcount_table_clusters is 0');
  const rtBytes = h.refcountTableClusters * clusterSize;
  if (rtBytes > MAX_REFCOUNT_TABLE_BYTES) {
    throw invalid('refcount_table_clusters', `refcount table of ${rtBytes} bytes exceeds the 8 MiB cap`);
  }
  checkTable('refcount_table_offset', h.refcountTableOffset, rtBytes);
  if (h.nbSnapshots > MAX_SNAPSHOTS) {
    throw invalid('nb_snapshots', `nb_snapshots ${h.nbSnapshots} exceeds ${MAX_SNAPSHOTS}`);
  }
  if (h.nbSnapshots > 0) checkTable('snapshots_offset', h.snapshotsOffset, 40);

  // Metadata areas must not overlap each other (QEMU checks the same before trusting them).
  const areas: [string, number, number][] = [['header', 0, clusterSize]];
  if (h.l1Size > 0) areas.push(['l1_table_offset', h.l1TableOffset, roundUp(h.l1Size * 8, clusterSize)]);
  areas.push(['refcount_table_offset', h.refcountTableOffset, rtBytes]);
  if (h.nbSnapshots > 0) areas.push(['snapshots_offset', h.snapshotsOffset, clusterSize]);
  for (let i = 0; i < areas.length; i++) {
    for (let j = i + 1; j < areas.length; j++) {
      const [na, a, al] = areas[i]!;
      const [nb, b, bl] = areas[j]!;
      if (a < b + bl && b < a + al) throw invalid(nb, `${nb} overlaps ${na}`);
    }
  }

  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_NAME) {
      throw invalid('backing_file_size', `backing file name of ${h.backingFileSize} bytes exceeds 1023`);
    }
    if (h.backingFileOffset < h.headerLength || h.backingFileOffset + h.backingFileSize > clusterSize) {
      throw invalid('backing_file_offset', 'backing file name lies outside cluster 0 after the header');
    }
    if (h.backingFileOffset + h.backingFileSize > head.length) {
      throw invalid('backing_file_offset', 'backing file name lies beyond the end of the file');
    }
  }

  const subclusterSize = extendedL2 ? clusterSize / 32 : clusterSize;
  return {
    ...h,
    version: version as 2 | 3,
    extendedL2,
    l2EntryBytes,
    l2Entries,
    l2Coverage,
    l1Needed,
    subclusterSize,
  };
}

/** Rounds n up to a multiple of m. */
export function roundUp(n: number, m: number): number {
  return Math.ceil(n / m) * m;
}
