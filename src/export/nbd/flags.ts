/** Transmission flags and the "is zeroing fast here" question, per export (pure). */
import type { BlockNode } from '../../block/types.js';
import {
  FLAG_CAN_MULTI_CONN,
  FLAG_HAS_FLAGS,
  FLAG_READ_ONLY,
  FLAG_SEND_CACHE,
  FLAG_SEND_DF,
  FLAG_SEND_FAST_ZERO,
  FLAG_SEND_FLUSH,
  FLAG_SEND_FUA,
  FLAG_SEND_TRIM,
  FLAG_SEND_WRITE_ZEROES,
} from './constants.js';

/**
 * The flags an export advertises. Multi-conn always: every connection
 * shares one node, and a flush reaches the image file for all of them (the
 * rule QEMU applies since 7.1).
 */
export function transmissionFlags(o: { writable: boolean; canTrim: boolean; structured: boolean }): number {
  let f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
  if (o.structured) f |= FLAG_SEND_DF;
  if (!o.writable) return f | FLAG_READ_ONLY;
  f |= FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
  if (o.canTrim) f |= FLAG_SEND_TRIM;
  return f;
}

/**
 * Whether write-zeroes is cheaper than writing zeroes: a qcow2 node (zero
 * clusters are metadata, with or without deallocation) somewhere below
 * windows and filters. A raw file here writes zero buffers: not fast.
 */
export function zeroIsFast(node: BlockNode): boolean {
  for (let n: BlockNode | undefined = node; n && n.role !== 'protocol'; n = n.children[0]) {
    if (n.driver === 'qcow2') return true;
  }
  return false;
}
