/**
 * The vhd (vpc) footer and dynamic-disk header: pure parsing and validation.
 * All fields are big-endian. The footer is 512 bytes at the end of the file;
 * dynamic and differencing disks keep a copy at offset 0, and QEMU (like us)
 * reads that copy when it is there; a file without it is a fixed disk, whose
 * data is the file up to the footer.
 */
import { BlkError } from '../../../errors.js';

export const FOOTER_SIZE = 512;
export const DYN_HEADER_SIZE = 1024;
export const TYPE_FIXED = 2;
export const TYPE_DYNAMIC = 3;
export const TYPE_DIFFERENCING = 4;
/** 2040 GiB, QEMU's limit (VHD_MAX_SECTORS). */
export const MAX_SECTORS = 0xff000000;
/** The largest CHS geometry (65535 cylinders, 16 heads, 255 sectors): such disks are sized by current_size. */
export const MAX_GEOMETRY = 65535 * 16 * 255;
/** An unallocated BAT entry. */
export const BAT_UNUSED = 0xffffffff;
/** Longest BAT read (entries that map the virtual size): 16 Mi entries, 64 MiB. */
export const MAX_BAT_ENTRIES = 16 * 1024 * 1024;
/** Creator applications whose disks QEMU sizes by current_size rather than CHS (QEMU 7.2's table). */
const CURRENT_SIZE_APPS = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'];

export interface VpcFooter {
  diskType: number;
  /** Where the dynamic header is (dynamic and differencing disks). */
  dataOffset: bigint;
  creatorApp: string;
  currentSize: bigint;
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
  uuid: Buffer;
  /** The virtual size QEMU reports. */
  size: number;
}

/** One's complement of the byte sum, with the 4 checksum bytes at `at` counted as zero. */
export function vpcChecksum(buf: Buffer, at: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) if (i < at || i >= at + 4) sum += buf[i]!;
  return ~sum >>> 0;
}

/**
 * Parses a footer found at offset 0 (`atStart`) or at the end of the file.
 * The size rule is QEMU's: CHS geometry, unless the creator application is
 * one that writes current_size exactly (Hyper-V, qemu-img's force_size,
 * disk2vhd, XenServer, XenConverter) or the geometry is the largest CHS can
 * say, when it is current_size rounded down to sectors.
 */
export function parseFooter(b: Buffer, atStart: boolean, path: string): VpcFooter {
  const bad = (code: 'IMAGE_CORRUPT' | 'IMAGE_UNSUPPORTED' | 'IMAGE_TOO_LARGE', msg: string, field: string) =>
    new BlkError(code, msg, { file: path, field });
  if (b.toString('latin1', 0, 8) !== 'conectix') {
    throw new BlkError('IMAGE_INVALID', 'no vhd footer (cookie "conectix") at offset 0 or at the end', {
      file: path,
      field: 'cookie',
    });
  }
  const stored = b.readUInt32BE(0x40);
  const computed = vpcChecksum(b, 0x40);
  if (stored !== computed) {
    throw bad(
      'IMAGE_CORRUPT',
      `footer checksum ${hex(stored)} does not match the footer (${hex(computed)})`,
      'checksum',
    );
  }
  const diskType = b.readUInt32BE(0x3c);
  if (atStart && diskType !== TYPE_DYNAMIC && diskType !== TYPE_DIFFERENCING) {
    throw bad(
      'IMAGE_CORRUPT',
      `the footer copy at offset 0 names disk type ${diskType} (only dynamic (3) and differencing (4) disks have one)`,
      'disk_type',
    );
  }
  if (!atStart && diskType !== TYPE_FIXED) {
    const msg =
      diskType === TYPE_DYNAMIC || diskType === TYPE_DIFFERENCING
        ? `disk type ${diskType} needs the footer copy at offset 0, which is missing`
        : `disk type ${diskType} is not a vhd disk type`;
    throw bad(
      diskType === TYPE_DYNAMIC || diskType === TYPE_DIFFERENCING ? 'IMAGE_CORRUPT' : 'IMAGE_UNSUPPORTED',
      msg,
      'disk_type',
    );
  }
  const creatorApp = b.toString('latin1', 0x1c, 0x20);
  const currentSize = b.readBigUInt64BE(0x30);
  const cylinders = b.readUInt16BE(0x38);
  const heads = b.readUInt8(0x3a);
  const sectorsPerTrack = b.readUInt8(0x3b);
  let sectors = cylinders * heads * sectorsPerTrack;
  if (CURRENT_SIZE_APPS.includes(creatorApp) || sectors === MAX_GEOMETRY) {
    const s = currentSize / 512n;
    if (s > BigInt(MAX_SECTORS)) {
      throw bad('IMAGE_TOO_LARGE', `current_size ${currentSize} is larger than 2040 GiB`, 'current_size');
    }
    sectors = Number(s);
  }
  if (sectors > MAX_SECTORS) {
    throw bad('IMAGE_TOO_LARGE', `the CHS geometry says ${sectors} sectors, more than 2040 GiB`, 'geometry');
  }
  return {
    diskType,
    dataOffset: b.readBigUInt64BE(0x10),
    creatorApp,
    currentSize,
    cylinders,
    heads,
    sectorsPerTrack,
    uuid: Buffer.from(b.subarray(0x44, 0x54)),
    size: sectors * 512,
  };
}

export interface ParentLocator {
  platform: string;
  dataLength: number;
  dataOffset: bigint;
}

export interface VpcDynHeader {
  tableOffset: bigint;
  maxTableEntries: number;
  blockSize: number;
  /** Bytes of the sector bitmap in front of each block (whole sectors). */
  bitmapSize: number;
  parentUuid: Buffer;
  /** The parent's name (UTF-16BE in the header), '' when none. */
  parentName: string;
  locators: ParentLocator[];
}

/** Parses and checks the 1024-byte dynamic disk header against the virtual size. */
export function parseDynHeader(b: Buffer, size: number, path: string): VpcDynHeader {
  const where = (field: string) => ({ file: path, field });
  if (b.toString('latin1', 0, 8) !== 'cxsparse') {
    throw new BlkError('IMAGE_CORRUPT', 'dynamic disk header has no "cxsparse" cookie', where('data_offset'));
  }
  const stored = b.readUInt32BE(0x24);
  const computed = vpcChecksum(b, 0x24);
  if (stored !== computed) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      `dynamic disk header checksum ${hex(stored)} does not match the header (${hex(computed)})`,
      where('dyn_header.checksum'),
    );
  }
  const blockSize = b.readUInt32BE(0x20);
  if (blockSize < 512 || (blockSize & (blockSize - 1)) !== 0) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      `block size ${blockSize} is not a power of two of at least 512`,
      where('block_size'),
    );
  }
  const maxTableEntries = b.readUInt32BE(0x1c);
  if (maxTableEntries * blockSize < size) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      `${maxTableEntries} BAT entries of ${blockSize} bytes do not cover the virtual size ${size}`,
      where('max_table_entries'),
    );
  }
  if (Math.ceil(size / blockSize) > MAX_BAT_ENTRIES) {
    throw new BlkError(
      'IMAGE_UNSUPPORTED',
      `the virtual size needs ${Math.ceil(size / blockSize)} BAT entries (at most ${MAX_BAT_ENTRIES} are read)`,
      where('block_size'),
    );
  }
  const locators: ParentLocator[] = [];
  for (let i = 0; i < 8; i++) {
    const at = 0x240 + i * 24;
    const platform = b.toString('latin1', at, at + 4);
    if (b.readUInt32BE(at) === 0) continue;
    locators.push({ platform, dataLength: b.readUInt32BE(at + 8), dataOffset: b.readBigUInt64BE(at + 16) });
  }
  return {
    tableOffset: b.readBigUInt64BE(0x10),
    maxTableEntries,
    blockSize,
    // QEMU's rule (whole sectors of one bit per sector; none for blocks under 4 KiB, as QEMU lays them out).
    bitmapSize: Math.ceil(Math.floor(blockSize / (8 * 512)) / 512) * 512,
    parentUuid: Buffer.from(b.subarray(0x28, 0x38)),
    parentName: utf16be(b.subarray(0x40, 0x240)),
    locators,
  };
}

/** A UTF-16BE string up to its first NUL. */
function utf16be(b: Buffer): string {
  const le = Buffer.alloc(b.length);
  for (let i = 0; i + 1 < b.length; i += 2) {
    le[i] = b[i + 1]!;
    le[i + 1] = b[i]!;
  }
  const s = le.toString('utf16le');
  const nul = s.indexOf('\0');
  return nul < 0 ? s : s.slice(0, nul);
}

function hex(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}
