/**
 * The region table: where the BAT and the metadata region live. It is
 * checksummed and stored twice (at 192 KiB and 256 KiB); the second copy is
 * used when the first fails its checksum (QEMU only reads the first). Every
 * region must lie past the header section and inside the file, and no two
 * regions (nor the log) may overlap.
 */
import { crc32cWithHole } from './crc32c.js';
import { corrupt, vhdxError } from './errors.js';
import {
  BAT_REGION,
  guidText,
  HEADER_SECTION,
  MAX_TABLE_ENTRIES,
  METADATA_REGION,
  REGION_TABLE_SIZE,
} from './layout.js';

export interface Region {
  offset: number;
  length: number;
}

export interface RegionTable {
  bat: Region;
  metadata: Region;
  /** Which copy was used: 0 or 1. */
  copy: 0 | 1;
  /** Every region (known or not), for overlap checks of blocks. */
  all: Region[];
}

/** True when the table copy's signature and checksum hold. */
function valid(buf: Buffer): boolean {
  return (
    buf.length >= REGION_TABLE_SIZE &&
    buf.toString('latin1', 0, 4) === 'regi' &&
    crc32cWithHole(buf.subarray(0, REGION_TABLE_SIZE), 4) === buf.readUInt32LE(4)
  );
}

/** Entry `i` of table `t`, checked to lie past the header section and inside the file. */
function decodeEntry(
  t: Buffer,
  i: number,
  fileLength: number,
  file: string,
): { guid: Buffer; region: Region; required: boolean } {
  const e = 16 + 32 * i;
  const field = `region_table.entry[${i}]`;
  const big = t.readBigUInt64LE(e + 16);
  const length = t.readUInt32LE(e + 24);
  if (big > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(file, field, 'file offset out of range');
  const offset = Number(big);
  if (offset < HEADER_SECTION) throw corrupt(file, field, `region at ${offset} lies in the header section`);
  if (offset + length > fileLength) {
    throw corrupt(
      file,
      field,
      `region [${offset}, ${offset + length}) lies past the end of the file (${fileLength} bytes)`,
    );
  }
  return {
    guid: t.subarray(e, e + 16),
    region: { offset, length },
    required: (t.readUInt32LE(e + 28) & 1) !== 0,
  };
}

/** True when [a, a+al) and [b, b+bl) overlap. */
export function overlaps(a: number, al: number, b: number, bl: number): boolean {
  return a < b + bl && b < a + al;
}

/**
 * Parses the region table from its two copies. `log` is the log's range
 * (regions may not overlap it), `fileLength` the file's length after log replay.
 */
export function parseRegionTable(
  copies: [Buffer, Buffer],
  log: Region,
  fileLength: number,
  file: string,
): RegionTable {
  const copy = valid(copies[0]) ? 0 : valid(copies[1]) ? 1 : undefined;
  if (copy === undefined) {
    throw corrupt(file, 'region_table', 'both region table copies fail the signature or checksum check');
  }
  const t = copies[copy];
  const count = t.readUInt32LE(8);
  if (count > MAX_TABLE_ENTRIES) {
    throw corrupt(file, 'region_table.entry_count', `${count} entries (at most ${MAX_TABLE_ENTRIES})`);
  }
  const taken: Region[] = log.length > 0 ? [log] : [];
  const all: Region[] = [];
  let bat: Region | undefined;
  let metadata: Region | undefined;
  for (let i = 0; i < count; i++) {
    const { guid, region, required } = decodeEntry(t, i, fileLength, file);
    const field = `region_table.entry[${i}]`;
    if (taken.some((r) => overlaps(region.offset, region.length, r.offset, r.length))) {
      throw corrupt(file, field, `region at ${region.offset} overlaps another region or the log`);
    }
    taken.push(region);
    all.push(region);
    if (guid.equals(BAT_REGION)) {
      if (bat) throw corrupt(file, field, 'a second BAT region');
      bat = region;
    } else if (guid.equals(METADATA_REGION)) {
      if (metadata) throw corrupt(file, field, 'a second metadata region');
      metadata = region;
    } else if (required) {
      throw vhdxError('IMAGE_UNSUPPORTED', file, field, `required region ${guidText(guid)} is not supported`);
    }
  }
  if (!bat) throw corrupt(file, 'region_table', 'no BAT region');
  if (!metadata) throw corrupt(file, 'region_table', 'no metadata region');
  return { bat, metadata, copy, all };
}
