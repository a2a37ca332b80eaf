/**
 * MBR partition tables: the four primary entries of sector 0 and, inside an
 * extended partition, the chain of extended boot records (EBRs) that holds the
 * logical partitions. Every entry comes from untrusted bytes and is checked
 * against the disk before it is used.
 */
import { type Ctx, checkNoOverlap, fail, readSectors } from './sectors.js';
import { type Partition, type PartitionTable, SECTOR_SIZE } from './types.js';

/** Caps that bound the work an image can make us do. */
const MAX_LOGICAL_PARTITIONS = 256;

const MBR_EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
/** The type of the single entry of a GPT disk's protective MBR. */
export const MBR_GPT_PROTECTIVE = 0xee;

/** True when the sector ends in the 55AA boot signature. */
export function hasBootSignature(sector: Buffer): boolean {
  return sector[510] === 0x55 && sector[511] === 0xaa;
}

/** One 16-byte entry of an MBR or EBR. */
export interface MbrEntry {
  slot: number;
  boot: number;
  type: number;
  start: number;
  sectors: number;
}

/** The four entries of an MBR or EBR sector, empty ones included. */
export function mbrEntries(sector: Buffer): MbrEntry[] {
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

/** The primary partitions of `mbr` (sector 0) and the logical ones of its extended partition. */
export async function parseMbr(ctx: Ctx, mbr: Buffer): Promise<PartitionTable> {
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
