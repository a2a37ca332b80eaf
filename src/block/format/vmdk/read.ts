/**
 * The read side of the vmdk driver: guest ranges split by extent, then by
 * grain. Flat extents read their file at the extent's offset (bytes past the
 * end of a short file read as zeroes, as in QEMU); ZERO extents are zeroes;
 * sparse extents go through their grain tables, unallocated grains show the
 * parent (or zeroes), zero grains are zeroes even with a parent, compressed
 * grains are inflated. mapHostCached answers the same from caches only, for
 * the FUSE fast path (null where a table is not cached: those ranges take
 * this JavaScript path); compressed grains map to their compressed bytes,
 * which the binding's workers inflate under the rules of stream.ts.
 */
import { BlkError } from '../../../errors.js';
import type { BlockExtent, BlockNode, CompressedHost, HostExtent } from '../../types.js';
import type { Extent } from './extents.js';
import {
  GRAIN_COMPRESSED,
  GRAIN_DATA,
  GRAIN_UNALLOCATED,
  GRAIN_ZERO,
  type GrainLookup,
  lookupGrain,
  lookupGrainCached,
  type SparseExtent,
} from './grains.js';

export interface VmdkReadState {
  path: string;
  size: number;
  extents: Extent[];
  backing: BlockNode | null;
  /** Why the parent may not be read (QEMU's CID check), or undefined when it may. */
  parentRefused: string | undefined;
}

/** Index of the extent holding guest byte `pos` (the last one ending after it). */
function findExtent(s: VmdkReadState, pos: number): number {
  let lo = 0;
  let hi = s.extents.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (s.extents[mid]!.start <= pos) lo = mid;
    else hi = mid - 1;
  }
  // Zero-length extents share their start with the next one: move past them.
  while (lo < s.extents.length - 1 && s.extents[lo]!.start + s.extents[lo]!.length <= pos) lo++;
  return lo;
}

/** Calls `fn(extent, relative offset, guest offset, length)` for each extent piece of [offset, offset+length). */
function forEachPiece<T>(
  s: VmdkReadState,
  offset: number,
  length: number,
  fn: (x: Extent, rel: number, pos: number, n: number) => T,
): T[] {
  const out: T[] = [];
  let pos = offset;
  const end = offset + length;
  for (let i = findExtent(s, pos); pos < end && i < s.extents.length; i++) {
    const x = s.extents[i]!;
    const n = Math.min(end, x.start + x.length) - pos;
    if (n <= 0) continue;
    out.push(fn(x, pos - x.start, pos, n));
    pos += n;
  }
  return out;
}

async function readParent(s: VmdkReadState, pos: number, dst: Buffer): Promise<void> {
  const b = s.backing;
  if (b === null) {
    dst.fill(0);
    return;
  }
  if (s.parentRefused !== undefined) {
    throw new BlkError('BACKING_CHAIN', s.parentRefused, { file: s.path, field: 'parentCID' });
  }
  const avail = Math.max(0, Math.min(dst.length, b.length() - pos));
  if (avail > 0) await b.read(pos, dst.subarray(0, avail));
  dst.fill(0, avail);
}

function grainPastEnd(x: Extent & { kind: 'sparse' }, host: number, n: number, rel: number): BlkError {
  const sp = x.sparse;
  const i = Math.floor(rel / sp.tableCoverage);
  const j = Math.floor(rel / sp.grainBytes) % sp.header.gtes;
  return new BlkError(
    'IMAGE_CORRUPT',
    `grain at ${host} (${n} bytes read) runs past the end of the file (${sp.fileLength} bytes)`,
    { file: sp.path, field: `grain table ${i} entry ${j}` },
  );
}

async function readSparse(
  s: VmdkReadState,
  x: Extent & { kind: 'sparse' },
  rel: number,
  pos: number,
  dst: Buffer,
) {
  const sp = x.sparse;
  const gb = sp.grainBytes;
  // Runs of data grains that lie back to back in the file are read with one pread.
  let runHost = -1;
  let runDst = 0;
  let runLen = 0;
  const flush = async () => {
    if (runLen > 0) await sp.node.read(runHost, dst.subarray(runDst, runDst + runLen));
    runLen = 0;
  };
  for (let done = 0; done < dst.length; ) {
    const r = rel + done;
    const inGrain = r % gb;
    const n = Math.min(gb - inGrain, dst.length - done);
    const g = await lookupGrain(sp, r);
    if (g.kind === GRAIN_DATA) {
      const host = g.host + inGrain;
      if (host + n > sp.fileLength) throw grainPastEnd(x, g.host, inGrain + n, r);
      if (runLen > 0 && runHost + runLen === host) runLen += n;
      else {
        await flush();
        runHost = host;
        runDst = done;
        runLen = n;
      }
    } else {
      await flush();
      const d = dst.subarray(done, done + n);
      if (g.kind === GRAIN_ZERO) d.fill(0);
      else if (g.kind === GRAIN_UNALLOCATED) await readParent(s, pos + done, d);
      else {
        const grain = await x.inflated!.get(g.host);
        if (inGrain + n > grain.length) {
          throw new BlkError(
            'IMAGE_CORRUPT',
            `compressed grain at ${g.host} inflates to ${grain.length} bytes, short of the ${inGrain + n} read`,
            { file: sp.path, field: `compressed grain at ${g.host}` },
          );
        }
        grain.copy(d, 0, inGrain, inGrain + n);
      }
    }
    done += n;
  }
  await flush();
}

async function readFlat(node: BlockNode, fileLength: number, at: number, dst: Buffer): Promise<void> {
  const avail = Math.max(0, Math.min(dst.length, fileLength - at));
  if (avail > 0) await node.read(at, dst.subarray(0, avail));
  dst.fill(0, avail);
}

/** Reads guest [offset, offset + buf.length) (bounds already checked by the node wrapper). */
export async function readGuest(s: VmdkReadState, offset: number, buf: Buffer): Promise<void> {
  const tasks = forEachPiece(s, offset, buf.length, (x, rel, pos, n) => {
    const dst = buf.subarray(pos - offset, pos - offset + n);
    if (x.kind === 'zero') {
      dst.fill(0);
      return Promise.resolve();
    }
    if (x.kind === 'flat') return readFlat(x.node, x.fileLength, x.fileOffset + rel, dst);
    return readSparse(s, x, rel, pos, dst);
  });
  await Promise.all(tasks);
}

/** Appends host extents (never writable), merging neighbours of the same fd or zero runs. */
function append(out: HostExtent[], more: HostExtent[] | null | undefined): boolean {
  if (!more) return false;
  for (const y of more) {
    if ('compressed' in y) {
      out.push({ length: y.length, compressed: { ...y.compressed } });
      continue;
    }
    const last = out[out.length - 1];
    if (last && 'zero' in last && 'zero' in y) last.length += y.length;
    else if (last && 'fd' in last && 'fd' in y && last.fd === y.fd && last.host + last.length === y.host)
      last.length += y.length;
    else if ('fd' in y) out.push({ length: y.length, fd: y.fd, host: y.host });
    else out.push({ length: y.length, zero: true });
  }
  return true;
}

function zero(length: number): HostExtent[] {
  return [{ length, zero: true }];
}

function mapParent(s: VmdkReadState, pos: number, n: number): HostExtent[] | null {
  const b = s.backing;
  if (b === null) return zero(n);
  if (s.parentRefused !== undefined) return null;
  const out: HostExtent[] = [];
  const avail = Math.max(0, Math.min(n, b.length() - pos));
  if (avail > 0 && !append(out, b.mapHostCached?.(pos, avail))) return null;
  if (avail < n) append(out, zero(n - avail));
  return out;
}

function mapFlat(x: Extent & { kind: 'flat' }, rel: number, n: number): HostExtent[] | null {
  const at = x.fileOffset + rel;
  const avail = Math.max(0, Math.min(n, x.fileLength - at));
  const out: HostExtent[] = [];
  if (avail > 0 && !append(out, x.node.mapHostCached?.(at, avail))) return null;
  if (avail < n) append(out, zero(n - avail));
  return out;
}

function mapSparse(s: VmdkReadState, x: Extent & { kind: 'sparse' }, rel: number, pos: number, n: number) {
  const sp = x.sparse;
  const gb = sp.grainBytes;
  const out: HostExtent[] = [];
  for (let done = 0; done < n; ) {
    const r = rel + done;
    const inGrain = r % gb;
    const k = Math.min(gb - inGrain, n - done);
    const g = lookupGrainCached(sp, r);
    if (g === undefined) return null;
    let piece: HostExtent[] | null | undefined;
    if (g.kind === GRAIN_COMPRESSED) {
      const c = compressedGrain(sp, g.host);
      if (c === null) return null;
      out.push({ length: k, compressed: { ...c, skip: inGrain } });
      done += k;
      continue;
    }
    if (g.kind === GRAIN_DATA) {
      const host = g.host + inGrain;
      if (host + k > sp.fileLength) return null;
      piece = sp.node.mapHostCached?.(host, k);
    } else if (g.kind === GRAIN_ZERO) piece = zero(k);
    else piece = mapParent(s, pos + done, k);
    if (!append(out, piece)) return null;
    done += k;
  }
  return out;
}

/** Grain sizes the binding's workers inflate (its cluster bits, 2^9 to 2^21: native-fuse/inflate.h). */
function nativeGrain(bytes: number): boolean {
  return bytes >= 512 && bytes <= 2 * 1024 * 1024 && (bytes & (bytes - 1)) === 0;
}

/**
 * The compressed bytes of the grain whose marker (or data) is at `host`, as
 * inflateGrain reads them: with markers, the marker and up to two grains
 * after it (the workers take the data's length from the marker); without,
 * up to one grain. Null when the grain cannot be inflated natively.
 */
function compressedGrain(sp: SparseExtent, host: number): Omit<CompressedHost, 'skip'> | null {
  const gb = sp.grainBytes;
  const clen = Math.min(sp.header.markers ? 2 * gb : gb, sp.fileLength - host);
  if (!nativeGrain(gb) || clen <= 0) return null;
  const m = sp.node.mapHostCached?.(host, clen);
  const x = m?.length === 1 ? m[0]! : undefined;
  if (x === undefined || !('fd' in x) || x.host !== host || x.length !== clen) return null;
  const algorithm = sp.header.markers ? 'vmdk-marker' : 'zlib-wrapped';
  return { fd: x.fd, host, clen, clusterSize: gb, algorithm };
}

/** Host extents of guest [offset, offset+length) from caches only; null when they cannot tell. */
export function mapHostCached(s: VmdkReadState, offset: number, length: number): HostExtent[] | null {
  try {
    const out: HostExtent[] = [];
    const pieces = forEachPiece(s, offset, length, (x, rel, pos, n) => {
      if (x.kind === 'zero') return zero(n);
      if (x.kind === 'flat') return mapFlat(x, rel, n);
      return mapSparse(s, x, rel, pos, n);
    });
    for (const p of pieces) if (!append(out, p)) return null;
    return out;
  } catch {
    // A bad entry: the read that reaches it reports it.
    return null;
  }
}

function statusOf(g: GrainLookup): 'data' | 'zero' | 'parent' {
  if (g.kind === GRAIN_DATA || g.kind === GRAIN_COMPRESSED) return 'data';
  return g.kind === GRAIN_ZERO ? 'zero' : 'parent';
}

/** Allocation status of the run starting at `offset` (at most `length` bytes, within one grain table). */
export async function blockStatus(s: VmdkReadState, offset: number, length: number): Promise<BlockExtent> {
  const x = s.extents[findExtent(s, offset)]!;
  const rel = offset - x.start;
  const max = Math.min(length, x.start + x.length - offset);
  if (x.kind === 'zero') return { offset, length: max, data: false, zero: true };
  if (x.kind === 'flat') return { offset, length: max, data: true, zero: false };
  const sp = x.sparse;
  const first = statusOf(await lookupGrain(sp, rel));
  // Extend over the following grains of the same kind, up to the end of this grain table.
  const limit = Math.min(max, sp.tableCoverage - (rel % sp.tableCoverage));
  let n = Math.min(limit, sp.grainBytes - (rel % sp.grainBytes));
  while (n < limit && statusOf(await lookupGrain(sp, rel + n)) === first)
    n = Math.min(limit, n + sp.grainBytes);
  if (first === 'data') return { offset, length: n, data: true, zero: false };
  if (first === 'zero' || s.backing === null || s.parentRefused !== undefined)
    return { offset, length: n, data: false, zero: true };
  if (offset >= s.backing.length()) return { offset, length: n, data: false, zero: true };
  const b = await s.backing.blockStatus(offset, Math.min(n, s.backing.length() - offset));
  return { offset, length: b.length, data: b.data, zero: b.zero };
}
