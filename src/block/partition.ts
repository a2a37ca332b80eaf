/**
 * MBR and GPT partition tables, parsed from untrusted bytes: what
 * `--partition N` and the `partition:` shorthand turn into a raw window
 * (offset, size) over a node. Pure: the caller supplies a read function.
 *
 * Numbering follows Linux: MBR primaries are 1–4 by slot (empty slots keep
 * their number), logical partitions of the extended partition are 5, 6, ... in
 * EBR-chain order; GPT partitions are numbered by entry slot (1-based).
 * Sector size is 512 bytes.
 */
import { crc32 } from 'node:zlib';
import { BlkError, type BlkErrorCode } from '../errors.js';

export const SECTOR_SIZE = 512;

export type PartitionScheme = 'mbr' | 'gpt';

/** One partition: a byte window over the disk. */
export interface Partition {
  /** Linux-style partition number (1-based). */
  index: number;
  /** Byte offset of the first sector. */
  offset: number;
  /** Length in bytes. */
  size: number;
  /** MBR: the type byte in hex as sfdisk prints it ("83"); GPT: the type GUID in upper case. */
  type: string;
  scheme: PartitionScheme;
}

/** Reads `length` bytes at `offset` of the disk (the caller's node). */
export type ReadAt = (offset: number, length: number) => Promise<Buffer>;

/** Caps that bound the work an image can make us do. */
const MAX_LOGICAL_PARTITIONS = 256;
const MAX_GPT_ENTRIES = 16384;
const MAX_GPT_ENTRY_SIZE = 4096;
const MAX_GPT_ARRAY_BYTES = 4 * 1024 * 1024;
const MIN_GPT_HEADER_SIZE = 92;

const MBR_EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const MBR_GPT_PROTECTIVE = 0xee;

/** The full parse: data partitions, plus the MBR extended container's number (not a data partition). */
interface PartitionTable {
  scheme: PartitionScheme;
  partitions: Partition[];
  extendedIndex?: number;
}

interface Ctx {
  read: ReadAt;
  diskSize: number;
  sectors: number;
  source: string;
}

function fail(ctx: Ctx, code: BlkErrorCode, message: string, field?: string): never {
  throw new BlkError(code, message, field === undefined ? { file: ctx.source } : { file: ctx.source, field });
}

/** Reads whole sectors after checking that they lie inside the disk. */
async function readSectors(ctx: Ctx, lba: number, count: number, what: string): Promise<Buffer> {
  if (!Number.isSafeInteger(lba) || lba < 0 || count < 1 || lba + count > ctx.sectors) {
    fail(ctx, 'IMAGE_CORRUPT', `${what} at sector ${lba} (+${count}) lies beyond the end of the disk`);
  }
  const offset = lba * SECTOR_SIZE;
  const length = count * SECTOR_SIZE;
  let buf: Buffer;
  try {
    buf = await ctx.read(offset, length);
  } catch (e) {
    throw new BlkError('IO', `cannot read ${what} at byte ${offset}: ${(e as Error).message}`, {
      file: ctx.source,
    });
  }
  if (buf.length !== length) {
    fail(ctx, 'IO', `short read of ${what} at byte ${offset}: ${buf.length} of ${length} bytes`);
  }
  return buf;
}

/** A little-endian u64 that must fit a sector number we can turn into a safe byte offset. */
function readLba(ctx: Ctx, buf: Buffer, at: number, field: string): number {
  const v = buf.readBigUInt64LE(at);
  if (v > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR_SIZE))) {
    fail(ctx, 'IMAGE_CORRUPT', `GPT ${field} ${v} is out of range`, field);
  }
  return Number(v);
}

function hasBootSignature(sector: Buffer): boolean {
  return sector[510] === 0x55 && sector[511] === 0xaa;
}

interface MbrEntry {
  slot: number;
  boot: number;
  type: number;
  start: number;
  sectors: number;
}

function mbrEntries(sector: Buffer): MbrEntry[] {
  const out: MbrEntry[] = [];
  for (let slot = 0; slot < 4; slot++) {
    const at = 446 + slot * 16;
    out.push({
      slot,
      boot: sector[at]!,
      type: sector[at + 4]!,
      start: sector.readUInt32LE(at + 8),
      sectors: sector.readUInt32LE(at + 12),
    });
  }
  return out;
}

function isUsed(e: MbrEntry): boolean {
  return e.type !== 0 && e.sectors !== 0;
}

/** Checks that [start, start+sectors) is a non-empty range after sector 0 and inside the disk. */
function checkExtent(ctx: Ctx, what: string, start: number, sectors: number): void {
  if (sectors === 0) fail(ctx, 'IMAGE_CORRUPT', `${what} has size 0`);
  if (start === 0) fail(ctx, 'IMAGE_CORRUPT', `${what} starts at sector 0, over the partition table`);
  if (start + sectors > ctx.sectors) {
    fail(
      ctx,
      'IMAGE_CORRUPT',
      `${what} (sectors ${start}–${start + sectors - 1}) lies beyond the end of the disk (${ctx.sectors} sectors)`,
    );
  }
}

function hex(type: number): string {
  return type.toString(16);
}

async function parseMbr(ctx: Ctx, mbr: Buffer): Promise<PartitionTable> {
  const entries = mbrEntries(mbr);
  const partitions: Partition[] = [];
  let extended: MbrEntry | undefined;
  for (const e of entries) {
    if (!isUsed(e)) continue;
    const what = `MBR partition ${e.slot + 1}`;
    checkExtent(ctx, what, e.start, e.sectors);
    if (MBR_EXTENDED_TYPES.has(e.type)) {
      if (extended) {
        fail(
          ctx,
          'IMAGE_CORRUPT',
          `MBR has more than one extended partition (${extended.slot + 1} and ${e.slot + 1})`,
        );
      }
      extended = e;
      continue;
    }
    partitions.push({
      index: e.slot + 1,
      offset: e.start * SECTOR_SIZE,
      size: e.sectors * SECTOR_SIZE,
      type: hex(e.type),
      scheme: 'mbr',
    });
  }
  // Primaries (the extended container included) must not overlap one another.
  const primaries = [...partitions];
  if (extended) {
    primaries.push({
      index: extended.slot + 1,
      offset: extended.start * SECTOR_SIZE,
      size: extended.sectors * SECTOR_SIZE,
      type: hex(extended.type),
      scheme: 'mbr',
    });
  }
  checkNoOverlap(ctx, primaries, 'MBR');
  if (!extended) return { scheme: 'mbr', partitions };

  const logicals = await parseEbrChain(ctx, extended);
  checkNoOverlap(ctx, logicals, 'MBR logical');
  return { scheme: 'mbr', partitions: [...partitions, ...logicals], extendedIndex: extended.slot + 1 };
}

/**
 * Follows the chain of extended boot records. Each EBR describes one logical
 * partition relative to itself and links to the next EBR relative to the start
 * of the extended partition; a chain that revisits an EBR, leaves the extended
 * partition or runs too long is refused.
 */
async function parseEbrChain(ctx: Ctx, extended: MbrEntry): Promise<Partition[]> {
  const extStart = extended.start;
  const extEnd = extended.start + extended.sectors;
  const seen = new Set<number>();
  const ebrs: number[] = [];
  const out: Partition[] = [];
  let ebr = extStart;
  let index = 5;
  for (;;) {
    if (seen.has(ebr))
      fail(ctx, 'IMAGE_CORRUPT', `MBR extended partition: EBR chain loops back to sector ${ebr}`);
    if (seen.size >= MAX_LOGICAL_PARTITIONS) {
      fail(
        ctx,
        'IMAGE_CORRUPT',
        `MBR extended partition: more than ${MAX_LOGICAL_PARTITIONS} logical partitions`,
      );
    }
    seen.add(ebr);
    ebrs.push(ebr);
    const sector = await readSectors(ctx, ebr, 1, `EBR`);
    if (!hasBootSignature(sector)) {
      fail(ctx, 'IMAGE_CORRUPT', `MBR extended partition: EBR at sector ${ebr} has no 55AA signature`);
    }
    const entries = mbrEntries(sector).filter(isUsed);
    const data = entries.find((e) => !MBR_EXTENDED_TYPES.has(e.type));
    const link = entries.find((e) => MBR_EXTENDED_TYPES.has(e.type));
    if (data) {
      const what = `logical partition ${index}`;
      const start = ebr + data.start;
      if (data.start === 0) fail(ctx, 'IMAGE_CORRUPT', `${what} starts on its own EBR (sector ${ebr})`);
      checkExtent(ctx, what, start, data.sectors);
      if (start + data.sectors > extEnd) {
        fail(
          ctx,
          'IMAGE_CORRUPT',
          `${what} (sectors ${start}–${start + data.sectors - 1}) lies outside the extended partition (sectors ${extStart}–${extEnd - 1})`,
        );
      }
      out.push({
        index,
        offset: start * SECTOR_SIZE,
        size: data.sectors * SECTOR_SIZE,
        type: hex(data.type),
        scheme: 'mbr',
      });
      index++;
    }
    if (!link) break;
    const next = extStart + link.start;
    if (link.start === 0 || next >= extEnd) {
      fail(
        ctx,
        'IMAGE_CORRUPT',
        `MBR extended partition: EBR at sector ${ebr} links outside the extended partition`,
      );
    }
    ebr = next;
  }
  // No logical partition may cover another EBR (writing to it would corrupt the chain).
  for (const p of out) {
    const first = p.offset / SECTOR_SIZE;
    const last = first + p.size / SECTOR_SIZE;
    const hit = ebrs.find((s) => s >= first && s < last);
    if (hit !== undefined)
      fail(ctx, 'IMAGE_CORRUPT', `logical partition ${p.index} covers the EBR at sector ${hit}`);
  }
  return out;
}

function checkNoOverlap(ctx: Ctx, parts: Partition[], what: string): void {
  const sorted = [...parts].sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1]!;
    const b = sorted[i]!;
    if (b.offset < a.offset + a.size) {
      fail(ctx, 'IMAGE_CORRUPT', `${what} partitions ${a.index} and ${b.index} overlap`);
    }
  }
}

/** The mixed-endian GUID text of 16 bytes at `at` (first three fields little-endian). */
function guidText(buf: Buffer, at: number): string {
  const h = (from: number, to: number, reverse: boolean): string => {
    const bytes = [...buf.subarray(at + from, at + to)];
    if (reverse) bytes.reverse();
    return bytes.map((b) => b.toString(16).padStart(2, '0')).join('');
  };
  return [h(0, 4, true), h(4, 6, true), h(6, 8, true), h(8, 10, false), h(10, 16, false)]
    .join('-')
    .toUpperCase();
}

/** One GPT copy (header + entry array) read and checked at `headerLba`; throws a BlkError naming what is wrong. */
async function parseGptAt(ctx: Ctx, headerLba: number, label: string): Promise<Partition[]> {
  const hdr = await readSectors(ctx, headerLba, 1, `${label} GPT header`);
  if (hdr.toString('latin1', 0, 8) !== 'EFI PART') {
    fail(
      ctx,
      'IMAGE_CORRUPT',
      `${label} GPT header at sector ${headerLba} has no "EFI PART" signature`,
      'signature',
    );
  }
  const headerSize = hdr.readUInt32LE(12);
  if (headerSize < MIN_GPT_HEADER_SIZE || headerSize > SECTOR_SIZE) {
    fail(ctx, 'IMAGE_CORRUPT', `${label} GPT header size ${headerSize} is not within 92–512`, 'header_size');
  }
  const storedCrc = hdr.readUInt32LE(16);
  const copy = Buffer.from(hdr.subarray(0, headerSize));
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== storedCrc) {
    fail(ctx, 'IMAGE_CORRUPT', `${label} GPT header CRC32 mismatch`, 'header_crc32');
  }
  const myLba = readLba(ctx, hdr, 24, 'my_lba');
  if (myLba !== headerLba) {
    fail(
      ctx,
      'IMAGE_CORRUPT',
      `${label} GPT header says it is at sector ${myLba}, found at ${headerLba}`,
      'my_lba',
    );
  }
  const firstUsable = readLba(ctx, hdr, 40, 'first_usable_lba');
  const lastUsable = readLba(ctx, hdr, 48, 'last_usable_lba');
  if (lastUsable >= ctx.sectors) {
    fail(
      ctx,
      'IMAGE_CORRUPT',
      `${label} GPT last usable sector ${lastUsable} lies beyond the end of the disk (${ctx.sectors} sectors)`,
      'last_usable_lba',
    );
  }
  if (firstUsable < 2 || firstUsable > lastUsable + 1) {
    fail(
      ctx,
      'IMAGE_CORRUPT',
      `${label} GPT usable range ${firstUsable}–${lastUsable} is invalid`,
      'first_usable_lba',
    );
  }
  const entriesLba = readLba(ctx, hdr, 72, 'partition_entry_lba');
  const count = hdr.readUInt32LE(80);
  const entrySize = hdr.readUInt32LE(84);
  if (entrySize < 128 || entrySize > MAX_GPT_ENTRY_SIZE || entrySize % 8 !== 0) {
    fail(
      ctx,
      'IMAGE_CORRUPT',
      `${label} GPT partition entry size ${entrySize} is invalid`,
      'size_of_partition_entry',
    );
  }
  if (count > MAX_GPT_ENTRIES || count * entrySize > MAX_GPT_ARRAY_BYTES) {
    fail(
      ctx,
      'IMAGE_CORRUPT',
      `${label} GPT has too many partition entries (${count})`,
      'num_partition_entries',
    );
  }
  const arrayBytes = count * entrySize;
  const arraySectors = Math.max(1, Math.ceil(arrayBytes / SECTOR_SIZE));
  const arrayEnd = entriesLba + arraySectors;
  const overlapsHeader = entriesLba <= headerLba && headerLba < arrayEnd;
  const overlapsUsable = entriesLba <= lastUsable && firstUsable < arrayEnd;
  if (entriesLba < 2 || arrayEnd > ctx.sectors || overlapsHeader || (arrayBytes > 0 && overlapsUsable)) {
    fail(
      ctx,
      'IMAGE_CORRUPT',
      `${label} GPT partition entry array (sectors ${entriesLba}–${arrayEnd - 1}) is outside the disk or overlaps the header or the usable area`,
      'partition_entry_lba',
    );
  }
  const array = await readSectors(ctx, entriesLba, arraySectors, `${label} GPT partition entries`);
  if (crc32(array.subarray(0, arrayBytes)) !== hdr.readUInt32LE(88)) {
    fail(
      ctx,
      'IMAGE_CORRUPT',
      `${label} GPT partition entry array CRC32 mismatch`,
      'partition_entry_array_crc32',
    );
  }

  const partitions: Partition[] = [];
  for (let i = 0; i < count; i++) {
    const at = i * entrySize;
    const typeBytes = array.subarray(at, at + 16);
    if (typeBytes.every((b) => b === 0)) continue;
    const index = i + 1;
    const first = readLba(ctx, array, at + 32, 'starting_lba');
    const last = readLba(ctx, array, at + 40, 'ending_lba');
    if (last < first) {
      fail(ctx, 'IMAGE_CORRUPT', `GPT partition ${index} ends (sector ${last}) before it starts (${first})`);
    }
    if (last >= ctx.sectors) {
      fail(
        ctx,
        'IMAGE_CORRUPT',
        `GPT partition ${index} (sectors ${first}–${last}) lies beyond the end of the disk (${ctx.sectors} sectors)`,
      );
    }
    if (first < firstUsable || last > lastUsable) {
      fail(
        ctx,
        'IMAGE_CORRUPT',
        `GPT partition ${index} (sectors ${first}–${last}) lies outside the usable area ${firstUsable}–${lastUsable}`,
      );
    }
    partitions.push({
      index,
      offset: first * SECTOR_SIZE,
      size: (last - first + 1) * SECTOR_SIZE,
      type: guidText(array, at),
      scheme: 'gpt',
    });
  }
  checkNoOverlap(ctx, partitions, 'GPT');
  return partitions;
}

/** The primary GPT, or the backup at the last sector when the primary is damaged. */
async function parseGpt(ctx: Ctx): Promise<PartitionTable> {
  let primaryError: unknown;
  try {
    return { scheme: 'gpt', partitions: await parseGptAt(ctx, 1, 'primary') };
  } catch (e) {
    if (!(e instanceof BlkError) || e.code !== 'IMAGE_CORRUPT') throw e;
    primaryError = e;
  }
  const backupLba = ctx.sectors - 1;
  try {
    return { scheme: 'gpt', partitions: await parseGptAt(ctx, backupLba, 'backup') };
  } catch (e) {
    if (!(e instanceof BlkError) || e.code !== 'IMAGE_CORRUPT') throw e;
    throw new BlkError(
      'IMAGE_CORRUPT',
      `no usable GPT: ${(primaryError as BlkError).message}; ${e.message}`,
      { file: ctx.source },
      { cause: e },
    );
  }
}

async function readTable(read: ReadAt, diskSize: number, source: string): Promise<PartitionTable> {
  const ctx: Ctx = { read, diskSize, sectors: Math.floor(diskSize / SECTOR_SIZE), source };
  if (!Number.isSafeInteger(diskSize) || diskSize < 0) {
    fail(ctx, 'INTERNAL', `invalid disk size ${diskSize}`);
  }
  if (ctx.sectors < 1) fail(ctx, 'IMAGE_INVALID', 'no partition table: the disk is smaller than one sector');
  const mbr = await readSectors(ctx, 0, 1, 'MBR');
  if (!hasBootSignature(mbr)) fail(ctx, 'IMAGE_INVALID', 'no partition table (no MBR boot signature 55AA)');
  const entries = mbrEntries(mbr);
  // A boot sector of a partitionless filesystem (FAT) also ends in 55AA; Linux tells them apart the same way.
  if (entries.some((e) => e.boot !== 0 && e.boot !== 0x80)) {
    fail(ctx, 'IMAGE_INVALID', 'no partition table (MBR entries have invalid boot flags)');
  }
  if (entries.some((e) => e.type === MBR_GPT_PROTECTIVE)) return parseGpt(ctx);
  return parseMbr(ctx, mbr);
}

/** Every data partition of the disk's MBR or GPT, in index order; refuses a malformed table. */
export async function listPartitions(read: ReadAt, diskSize: number, source: string): Promise<Partition[]> {
  const table = await readTable(read, diskSize, source);
  return [...table.partitions].sort((a, b) => a.index - b.index);
}

/** Partition number `index` (Linux numbering) of the disk's MBR or GPT; a BlkError naming `source` if absent or bad. */
export async function findPartition(
  read: ReadAt,
  diskSize: number,
  index: number,
  source: string,
): Promise<Partition> {
  if (!Number.isSafeInteger(index) || index < 1) {
    throw new BlkError('USAGE', `partition number must be a positive integer, not ${index}`, {
      file: source,
    });
  }
  const table = await readTable(read, diskSize, source);
  const found = table.partitions.find((p) => p.index === index);
  if (found) return found;
  if (table.extendedIndex === index) {
    throw new BlkError(
      'OUT_OF_RANGE',
      `partition ${index} is the MBR extended partition (a container); its logical partitions are numbered from 5`,
      { file: source },
    );
  }
  const have = table.partitions.map((p) => p.index).sort((a, b) => a - b);
  throw new BlkError(
    'OUT_OF_RANGE',
    `partition ${index} does not exist (${table.scheme.toUpperCase()} has ${have.length ? `partitions ${have.join(', ')}` : 'no partitions'})`,
    { file: source },
  );
}
