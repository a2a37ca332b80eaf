/**
 * The bitmap directory (bitmaps extension): read for `info` only. Bitmaps
 * never change what the guest reads; a reader just has to not trip over them.
 */
import { BlkError } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import type { Qcow2Extensions } from './extensions.js';
import type { Qcow2Header } from './header.js';

/** QEMU's own cap on the bitmap directory. */
const MAX_DIRECTORY_BYTES = 64 * 1024 * 1024;
const MAX_BITMAPS = 65535;

export interface Qcow2Bitmap {
  name: string;
  granularity: number;
  flags: string[];
}

/** Reads and checks the bitmap directory (empty when the image has none). */
export async function readBitmaps(
  h: Qcow2Header,
  ext: Qcow2Extensions,
  file: BlockNode,
  fileLength: number,
  path: string,
): Promise<Qcow2Bitmap[]> {
  const b = ext.bitmaps;
  if (!b) return [];
  const invalid = (msg: string) =>
    new BlkError('IMAGE_INVALID', msg, { file: path, field: 'bitmaps_extension' });
  if (b.count === 0 || b.count > MAX_BITMAPS) throw invalid(`bitmap count ${b.count} is out of range`);
  if (b.directorySize > MAX_DIRECTORY_BYTES) throw invalid('bitmap directory exceeds 64 MiB');
  if (b.directoryOffset % h.clusterSize !== 0 || b.directoryOffset + b.directorySize > fileLength) {
    throw invalid('bitmap directory is unaligned or lies beyond the end of the file');
  }
  const dir = Buffer.allocUnsafe(b.directorySize);
  await file.read(b.directoryOffset, dir);
  const out: Qcow2Bitmap[] = [];
  let at = 0;
  for (let i = 0; i < b.count; i++) {
    if (at + 24 > dir.length) throw invalid('bitmap directory entry runs past the directory');
    const flags = dir.readUInt32BE(at + 12);
    const granularityBits = dir[at + 17]!;
    const nameSize = dir.readUInt16BE(at + 18);
    const extra = dir.readUInt32BE(at + 20);
    const end = at + 24 + extra + nameSize;
    if (end > dir.length) throw invalid('bitmap directory entry runs past the directory');
    if (granularityBits > 63) throw invalid(`bitmap granularity bits ${granularityBits} out of range`);
    const names: string[] = [];
    if (flags & 1) names.push('in-use');
    if (flags & 2) names.push('auto');
    out.push({
      name: dir.toString('utf8', at + 24 + extra, end),
      granularity: 2 ** granularityBits,
      flags: names,
    });
    at = Math.ceil(end / 8) * 8;
  }
  return out;
}
