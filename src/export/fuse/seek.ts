/**
 * lseek SEEK_DATA / SEEK_HOLE on an exported node, from the block layer's
 * block status (as qemu-storage-daemon answers them): a hole is a range that
 * reads as zeroes or holds no data; past the end ENXIO, except the rounding
 * tail up to the next 512 bytes, which is a hole.
 */
import type { BlockNode } from '../../block/types.js';
import { Errno } from '../../errors.js';
import { FuseErrno } from './file-fs.js';

/** lseek whence values the kernel passes on (SEEK_SET/CUR/END never reach us). */
const SEEK = { DATA: 3, HOLE: 4 } as const;
/** Block-status calls one lseek may make before answering conservatively. */
const MAX_SEEK_STEPS = 100_000;

/** Rounds up to the next multiple of 512, as QSD reports the size. */
export function roundUpToSector(n: number): number {
  return Math.ceil(n / 512) * 512;
}

/** The offset lseek(offset, whence) answers for `node`, or a FuseErrno (EINVAL, ENXIO). */
export async function seekDataOrHole(node: BlockNode, offset: number, whence: number): Promise<number> {
  const size = node.length();
  if (whence !== SEEK.DATA && whence !== SEEK.HOLE) throw new FuseErrno(Errno.EINVAL);
  if (offset >= size) {
    if (whence === SEEK.HOLE && offset < roundUpToSector(size)) return offset;
    throw new FuseErrno(Errno.ENXIO);
  }
  let pos = offset;
  for (let i = 0; pos < size && i < MAX_SEEK_STEPS; i++) {
    const ext = await node.blockStatus(pos, size - pos);
    const hole = ext.zero || !ext.data;
    if (hole === (whence === SEEK.HOLE)) return pos;
    pos = ext.offset + ext.length;
  }
  if (pos < size) return whence === SEEK.DATA ? pos : size; // too fragmented to walk: claim data
  if (whence === SEEK.DATA) throw new FuseErrno(Errno.ENXIO);
  return size;
}
