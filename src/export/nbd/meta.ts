/**
 * Metadata contexts: which ones a query selects, and the block status
 * descriptors of `base:allocation` (NBD_STATE_HOLE where nothing is
 * allocated, NBD_STATE_ZERO where the range reads as zeroes, as qemu-nbd
 * reports them). Pure except collectAllocation, which asks the node.
 */
import type { BlockExtent, BlockNode } from '../../block/types.js';
import { CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO } from './constants.js';
import type { StatusDescriptor } from './wire.js';

/** The contexts this server offers, with the ids SET_META_CONTEXT answers (never 0: easier to spot in traces). */
export const CONTEXTS: ReadonlyMap<string, number> = new Map([[CONTEXT_BASE_ALLOCATION, 1]]);

/**
 * The context names `queries` select. LIST with no query lists everything,
 * and a bare namespace (`base:`) is a wildcard for LIST but selects nothing
 * for SET; unknown namespaces and leaf names are ignored, as the protocol says.
 */
export function selectContexts(queries: readonly string[], mode: 'list' | 'set'): string[] {
  if (queries.length === 0) return mode === 'list' ? [...CONTEXTS.keys()] : [];
  const out = new Set<string>();
  for (const q of queries) {
    const colon = q.indexOf(':');
    if (colon <= 0) continue;
    const ns = q.slice(0, colon + 1);
    for (const name of CONTEXTS.keys()) {
      if (q === name) out.add(name);
      else if (mode === 'list' && q === ns && name.startsWith(ns)) out.add(name);
    }
  }
  return [...out];
}

/** A query a context request may carry must start with a namespace and a colon. */
export function isQuerySyntaxValid(q: string): boolean {
  return q.indexOf(':') > 0;
}

/** The base:allocation flags of one extent. */
export function allocationFlags(e: Pick<BlockExtent, 'data' | 'zero'>): number {
  return (e.data ? 0 : STATE_HOLE) | (e.zero ? STATE_ZERO : 0);
}

/** Appends a descriptor, merging it into the last one when the flags are equal. */
export function pushDescriptor(out: StatusDescriptor[], length: number, flags: number): void {
  const last = out[out.length - 1];
  if (last && last.flags === flags && last.length + length <= 0xffffffff) last.length += length;
  else out.push({ length, flags });
}

/**
 * base:allocation descriptors for [offset, offset+length) (the caller has
 * checked the range). Stops after `maxDescriptors` (or one with REQ_ONE):
 * the protocol lets a server answer less, and the client asks again.
 */
export async function collectAllocation(
  node: BlockNode,
  offset: number,
  length: number,
  maxDescriptors: number,
): Promise<StatusDescriptor[]> {
  const out: StatusDescriptor[] = [];
  const end = offset + length;
  let at = offset;
  // Each call answers at least one byte; the descriptor count bounds the loop for a hostile image.
  for (let calls = 0; at < end && calls < maxDescriptors * 4; calls++) {
    const e = await node.blockStatus(at, end - at);
    const len = Math.min(e.length, end - at);
    if (len <= 0) break;
    const flags = allocationFlags(e);
    const merges = out.length > 0 && out[out.length - 1]!.flags === flags;
    if (!merges && out.length >= maxDescriptors) break;
    pushDescriptor(out, len, flags);
    at += len;
  }
  if (out.length === 0) out.push({ length, flags: 0 }); // "unknown": always safe to report
  return out;
}
