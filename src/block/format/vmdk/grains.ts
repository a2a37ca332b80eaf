/**
 * One hosted sparse extent: its grain directory (read once, bounded by the
 * header checks), grain tables (read on demand into a byte-bounded cache)
 * and the lookup of one guest offset, with QEMU's meanings: a directory or
 * table entry of 0 is unallocated (the parent shows through), a table entry
 * of 1 is a zero grain when the header's zero-grain flag is set, anything
 * else is the sector of the grain (of its marker, for compressed grains).
 * Tables and grains that point past the end of the file are corruption.
 */
import { BlkError } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import { TableCache } from '../qcow2/table-cache.js';
import { SECTOR, type SparseHeader } from './sparse-header.js';

/** Grain-table bytes cached per extent (512 tables of 512 entries). */
const GT_CACHE_BYTES = 1024 * 1024;

export const GRAIN_DATA = 0;
export const GRAIN_ZERO = 1;
export const GRAIN_UNALLOCATED = 2;
export const GRAIN_COMPRESSED = 3;

export interface GrainLookup {
  kind: typeof GRAIN_DATA | typeof GRAIN_ZERO | typeof GRAIN_UNALLOCATED | typeof GRAIN_COMPRESSED;
  /** GRAIN_DATA: host byte offset of the grain; GRAIN_COMPRESSED: of its marker (or data). */
  host: number;
}

export interface SparseExtent {
  node: BlockNode;
  path: string;
  fileLength: number;
  header: SparseHeader;
  grainBytes: number;
  /** Guest bytes one grain table maps. */
  tableCoverage: number;
  gd: Uint32Array;
  tables: TableCache;
}

async function readAt(node: BlockNode, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.allocUnsafe(length);
  await node.read(offset, b);
  return b;
}

/** Reads the grain directory of a checked header and sets up the table cache. */
export async function openSparseExtent(
  node: BlockNode,
  header: SparseHeader,
  path: string,
): Promise<SparseExtent> {
  const fileLength = node.length();
  // parseSparseHeader checked gdOffset + gdEntries * 4 <= fileLength: this allocation is bounded by the file.
  const raw =
    header.gdEntries > 0 ? await readAt(node, header.gdOffset, header.gdEntries * 4) : Buffer.alloc(0);
  const gd = new Uint32Array(header.gdEntries);
  for (let i = 0; i < gd.length; i++) gd[i] = raw.readUInt32LE(i * 4);
  const tableBytes = header.gtes * 4;
  const s: SparseExtent = {
    node,
    path,
    fileLength,
    header,
    grainBytes: header.grainSectors * SECTOR,
    tableCoverage: header.gtes * header.grainSectors * SECTOR,
    gd,
    tables: new TableCache(Math.max(GT_CACHE_BYTES, tableBytes), (off) => readAt(node, off, tableBytes)),
  };
  return s;
}

/** Host offset of the grain table of directory entry `i`, 0 when none; throws when it lies past the end of the file. */
function tableOffset(s: SparseExtent, i: number): number {
  const entry = s.gd[i]!;
  if (entry === 0) return 0;
  const off = entry * SECTOR;
  if (off + s.header.gtes * 4 > s.fileLength) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      `grain table at ${off} (directory entry ${i}) lies past the end of the file (${s.fileLength} bytes)`,
      { file: s.path, field: `grain directory entry ${i}` },
    );
  }
  return off;
}

function decode(s: SparseExtent, table: Buffer, rel: number): GrainLookup {
  const index = Math.floor(rel / s.grainBytes) % s.header.gtes;
  const e = table.readUInt32LE(index * 4);
  if (e === 0) return { kind: GRAIN_UNALLOCATED, host: 0 };
  if (e === 1 && s.header.zeroGrain) return { kind: GRAIN_ZERO, host: 0 };
  const host = e * SECTOR;
  // A grain must start inside the file; how much of it must be there is checked by the reader.
  if (host >= s.fileLength) {
    const gi = Math.floor(rel / s.tableCoverage);
    throw new BlkError(
      'IMAGE_CORRUPT',
      `grain at ${host} lies past the end of the file (${s.fileLength} bytes)`,
      { file: s.path, field: `grain table ${gi} entry ${index}` },
    );
  }
  return { kind: s.header.compressed ? GRAIN_COMPRESSED : GRAIN_DATA, host };
}

/** Where the grain holding extent byte `rel` lives (loads its grain table when not cached). */
export async function lookupGrain(s: SparseExtent, rel: number): Promise<GrainLookup> {
  const i = Math.floor(rel / s.tableCoverage);
  // QEMU reads an index past the directory as unallocated (VMDK_ERROR is "not OK").
  if (i >= s.gd.length) return { kind: GRAIN_UNALLOCATED, host: 0 };
  const off = tableOffset(s, i);
  if (off === 0) return { kind: GRAIN_UNALLOCATED, host: 0 };
  return decode(s, await s.tables.get(off), rel);
}

/** lookupGrain from cached tables only; undefined when the table is not cached. */
export function lookupGrainCached(s: SparseExtent, rel: number): GrainLookup | undefined {
  const i = Math.floor(rel / s.tableCoverage);
  if (i >= s.gd.length) return { kind: GRAIN_UNALLOCATED, host: 0 };
  const off = tableOffset(s, i);
  if (off === 0) return { kind: GRAIN_UNALLOCATED, host: 0 };
  const table = s.tables.peek(off);
  return table === undefined ? undefined : decode(s, table, rel);
}
