/**
 * The parse context shared by the MBR and GPT parsers: bounds-checked sector
 * reads from the untrusted disk, and the error every refusal goes through.
 */
import { BlkError, type BlkErrorCode } from '../../errors.js';
import { type Partition, type ReadAt, SECTOR_SIZE } from './types.js';

/** One parse: how to read the disk, its size, and the name errors carry. */
export interface Ctx {
  read: ReadAt;
  diskSize: number;
  sectors: number;
  source: string;
}

/** Throws a BlkError naming the disk (and the table field, when there is one). */
export function fail(ctx: Ctx, code: BlkErrorCode, message: string, field?: string): never {
  throw new BlkError(code, message, field === undefined ? { file: ctx.source } : { file: ctx.source, field });
}

/** Reads whole sectors after checking that they lie inside the disk. */
export async function readSectors(ctx: Ctx, lba: number, count: number, what: string): Promise<Buffer> {
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

/** Refuses partitions (of one table level) that overlap one another. */
export function checkNoOverlap(ctx: Ctx, parts: Partition[], what: string): void {
  const sorted = [...parts].sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1]!;
    const b = sorted[i]!;
    if (b.offset < a.offset + a.size) {
      fail(ctx, 'IMAGE_CORRUPT', `${what} partitions ${a.index} and ${b.index} overlap`);
    }
  }
}
