/**
 * GPT partition tables: the primary header at sector 1 and its entry array,
 * or the backup header at the last sector when the primary is damaged. Every
 * field comes from untrusted bytes: CRCs, sizes and ranges are checked before
 * anything is read or trusted.
 */
import { crc32 } from 'node:zlib';
import { BlkError } from '../../errors.js';
import { type Ctx, checkNoOverlap, fail, readSectors } from './sectors.js';
import { type Partition, type PartitionTable, SECTOR_SIZE } from './types.js';

/** Caps that bound the work an image can make us do. */
const MAX_GPT_ENTRIES = 16384;
const MAX_GPT_ENTRY_SIZE = 4096;
const MAX_GPT_ARRAY_BYTES = 4 * 1024 * 1024;
const MIN_GPT_HEADER_SIZE = 92;

/** A little-endian u64 that must fit a sector number we can turn into a safe byte offset. */
function readLba(ctx: Ctx, buf: Buffer, at: number, field: string): number {
  const v = buf.readBigUInt64LE(at);
  if (v > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR_SIZE))) {
    fail(ctx, 'IMAGE_CORRUPT', `GPT ${field} ${v} is out of range`, field);
  }
  return Number(v);
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
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
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
export async function parseGpt(ctx: Ctx): Promise<PartitionTable> {
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
