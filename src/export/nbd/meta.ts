/**
 * Metadata contexts: which ones a query selects, and their block status
 * descriptors: `base:allocation` (NBD_STATE_HOLE where nothing is
 * allocated, NBD_STATE_ZERO where the range reads as zeroes, as qemu-nbd
 * reports them) and QEMU's `qemu:allocation-depth` (the whole 32-bit value
 * is the backing-chain layer that answers: 0 none, 1 the image itself, 2 its
 * backing file, ...). Pure except collectExtents, which asks the node.
 */
import type { BlockExtent, BlockNode } from '../../block/types.js';
import { CONTEXT_ALLOCATION_DEPTH, CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO } from './constants.js';
import type { StatusDescriptor } from './wire.js';

/** The contexts this server offers, with the ids SET_META_CONTEXT answers (never 0: easier to spot in traces). */
export const CONTEXTS: ReadonlyMap<string, number> = new Map([
  [CONTEXT_BASE_ALLOCATION, 1],
  [CONTEXT_ALLOCATION_DEPTH, 2],
]);

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

/** The qemu:allocation-depth value of one extent. */
export function depthOf(e: Pick<BlockExtent, 'data' | 'depth'>): number {
  return e.depth ?? (e.data ? 1 : 0);
}

/** A context's status value of one extent. */
export function contextFlags(context: string, e: BlockExtent): number {
  return context === CONTEXT_ALLOCATION_DEPTH ? depthOf(e) : allocationFlags(e);
}

/** Appends a descriptor, merging it into the last one when the flags are equal. */
export function pushDescriptor(out: StatusDescriptor[], length: number, flags: number): void {
  const last = out[out.length - 1];
  if (last && last.flags === flags && last.length + length <= 0xffffffff) last.length += length;
  else out.push({ length, flags });
}

/** One extent of a range, clipped to it. */
export interface ClippedExtent {
  length: number;
  extent: BlockExtent;
}

/**
 * The node's extents over [offset, offset+length) (the caller has checked
 * the range), at most `maxExtents` of them: the protocol lets a server
 * answer less, and the client asks again for the rest.
 */
export async function collectExtents(
  node: BlockNode,
  offset: number,
  length: number,
  maxExtents: number,
): Promise<ClippedExtent[]> {
  const out: ClippedExtent[] = [];
  const end = offset + length;
  // Each call answers at least one byte; the extent count bounds the loop for a hostile image.
  for (let at = offset; at < end && out.length < maxExtents; ) {
    const e = await node.blockStatus(at, end - at);
    const len = Math.min(e.length, end - at);
    if (len <= 0) break;
    out.push({ length: len, extent: e });
    at += len;
  }
  return out;
}

/** Descriptors of one context over collected extents (merged where the value repeats; "unknown" when none). */
export function descriptorsFor(
  context: string,
  extents: readonly ClippedExtent[],
  length: number,
): StatusDescriptor[] {
  const out: StatusDescriptor[] = [];
  for (const x of extents) pushDescriptor(out, x.length, contextFlags(context, x.extent));
  if (out.length === 0) out.push({ length, flags: 0 }); // always safe to report
  return out;
}

/** base:allocation descriptors for [offset, offset+length) (at most `maxExtents` block status answers). */
export async function collectAllocation(
  node: BlockNode,
  offset: number,
  length: number,
  maxExtents: number,
): Promise<StatusDescriptor[]> {
  return descriptorsFor(
    CONTEXT_BASE_ALLOCATION,
    await collectExtents(node, offset, length, maxExtents),
    length,
  );
}
