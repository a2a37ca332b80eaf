/**
 * Guest ranges to pieces, from the BAT alone (no I/O): bytes in the file,
 * zeroes, bytes of the parent, a partially present block (sector by sector,
 * from its chunk's sector bitmap), or a block whose state is invalid.
 *
 * Block states (MS-VHDX 2.5.1.1): FULLY_PRESENT reads the file;
 * NOT_PRESENT reads the parent of a differencing image and zeroes otherwise;
 * ZERO, UNDEFINED and UNMAPPED read zeroes (the specification allows zeroes
 * for the last two, and QEMU reads zeroes); PARTIALLY_PRESENT is valid only in
 * a differencing image; the reserved states 4 and 5 are corruption.
 */
import { entryOffset, entryState, type Geometry, payloadIndex } from './bat.js';
import {
  PAYLOAD_FULLY_PRESENT,
  PAYLOAD_NOT_PRESENT,
  PAYLOAD_PARTIALLY_PRESENT,
  PAYLOAD_UNDEFINED,
  PAYLOAD_UNMAPPED,
  PAYLOAD_ZERO,
} from './layout.js';

export const DATA = 0;
export const ZERO = 1;
export const PARENT = 2;
export const PARTIAL = 3;
export const BAD = 4;

export type Piece =
  | { kind: typeof DATA; length: number; host: number }
  | { kind: typeof ZERO | typeof PARENT; length: number }
  | { kind: typeof PARTIAL; length: number; block: number; inBlock: number }
  | { kind: typeof BAD; length: number; index: number; why: string };

/** The pieces of guest [offset, offset+length), contiguous pieces of the same kind merged. */
export function mapGuest(g: Geometry, bat: Buffer, offset: number, length: number): Piece[] {
  const out: Piece[] = [];
  const end = offset + length;
  for (let pos = offset; pos < end; ) {
    const b = Math.floor(pos / g.blockSize);
    const inBlock = pos - b * g.blockSize;
    const n = Math.min(g.blockSize - inBlock, end - pos);
    const i = payloadIndex(g, b);
    const st = entryState(bat, i);
    let p: Piece;
    switch (st) {
      case PAYLOAD_FULLY_PRESENT:
        p = { kind: DATA, length: n, host: entryOffset(bat, i) + inBlock };
        break;
      case PAYLOAD_NOT_PRESENT:
        p = { kind: g.hasParent ? PARENT : ZERO, length: n };
        break;
      case PAYLOAD_ZERO:
      case PAYLOAD_UNDEFINED:
      case PAYLOAD_UNMAPPED:
        p = { kind: ZERO, length: n };
        break;
      case PAYLOAD_PARTIALLY_PRESENT:
        p = g.hasParent
          ? { kind: PARTIAL, length: n, block: b, inBlock }
          : { kind: BAD, length: n, index: i, why: 'a partially present block in an image without a parent' };
        break;
      default:
        p = { kind: BAD, length: n, index: i, why: `reserved block state ${st}` };
    }
    const last = out[out.length - 1];
    if (last && last.kind === p.kind && (p.kind === ZERO || p.kind === PARENT)) last.length += n;
    else if (last && last.kind === DATA && p.kind === DATA && last.host + last.length === p.host)
      last.length += n;
    else out.push(p);
    pos += n;
  }
  return out;
}
