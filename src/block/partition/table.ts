/**
 * MBR and GPT partition tables, parsed from untrusted bytes: what
 * `--partition N`, the `partition:` shorthand and the `partition` filter
 * driver turn into a window (offset, size) over a node. Pure: the caller
 * supplies a read function (nodeReader makes one from a node).
 */
import { BlkError } from '../../errors.js';
import type { BlockNode } from '../types.js';
import { parseGpt } from './gpt.js';
import { hasBootSignature, MBR_GPT_PROTECTIVE, mbrEntries, parseMbr } from './mbr.js';
import { type Ctx, fail, readSectors } from './sectors.js';
import { type Partition, type PartitionTable, type ReadAt, SECTOR_SIZE } from './types.js';

/** A ReadAt over an open node (reads the exact range into a fresh buffer). */
export function nodeReader(node: BlockNode): ReadAt {
  return async (offset, length) => {
    const buf = Buffer.alloc(length);
    await node.read(offset, buf);
    return buf;
  };
}

/** The whole table of the disk: MBR (with its logical partitions) or GPT; refuses a malformed one. */
export async function readTable(read: ReadAt, diskSize: number, source: string): Promise<PartitionTable> {
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
