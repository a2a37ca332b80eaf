/** Read-only views into an open qcow2 node for tools and tests (check, info). */
import { BlkError } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import { DATA, type MappedExtent, mapRange } from './mapping.js';
import type { Qcow2State } from './state.js';

const states = new WeakMap<BlockNode, Qcow2State>();

/** Records the state behind a qcow2 node (called by the driver when the node is wrapped). */
export function registerQcow2Node(node: BlockNode, s: Qcow2State): void {
  states.set(node, s);
}

/** The qcow2 state behind a node (tools: check, repair). */
export function stateOf(node: BlockNode): Qcow2State {
  const s = states.get(node);
  if (!s) throw new BlkError('NOT_SUPPORTED', `node '${node.nodeName}' is not a qcow2 node`);
  return s;
}

/**
 * Refcount of the host cluster at `hostOffset`; a negative value asks for the
 * cluster holding guest offset 0's data (handy in tests).
 */
export async function qcow2Refcount(node: BlockNode, hostOffset: number): Promise<number> {
  const s = stateOf(node);
  let host = hostOffset;
  if (host < 0) {
    const ext: MappedExtent[] = [];
    await mapRange(s, 0, 1, ext);
    if (ext[0]?.kind !== DATA) throw new BlkError('OUT_OF_RANGE', 'guest offset 0 is not allocated');
    host = ext[0].host;
  }
  return s.refcounts.get(host);
}

/** Counters of the node's L2-table cache (hits, misses, loads, evictions) and its size in bytes. */
export function qcow2CacheStats(node: BlockNode): {
  hits: number;
  misses: number;
  loads: number;
  evictions: number;
  bytes: number;
} {
  const s = stateOf(node);
  return { ...s.l2Cache.stats, bytes: s.l2Cache.size };
}
