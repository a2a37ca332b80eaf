/**
 * Host clusters the writer must not trust: referenced more often than their
 * refcount says, or referenced more than once while an active entry claims
 * them with COPIED (which tells a writer "refcount 1, yours alone"). QEMU
 * trusts COPIED; a hostile image can then map two guest clusters onto one
 * host cluster, and a write through one changes the other (or a discard frees
 * a cluster still in use, which the next allocation hands out again).
 *
 * prepareWritable scans once, before the first write: every reference the
 * metadata makes is counted (the walk of `check`, countReferences) and
 * compared with the refcounts. A write, write-zeroes or discard that touches
 * a guest cluster mapped onto such a cluster (its data, its compressed bytes,
 * or its L2 table) is refused with EIO and the reason; the FUSE binding's
 * in-place writes never get such a cluster (map-host.ts), and the allocator
 * never hands one out. The rest of the image is written as usual.
 */
import { BlkError, Errno } from '../../../errors.js';
import { countReferences } from './check.js';
import { readL1Entry, readL2Entry } from './entries.js';
import type { Qcow2State } from './state.js';

/** Host clusters per page of the reference counter (one byte each). */
const PAGE = 4096;
/** In a counter byte: an active COPIED entry claims the cluster. */
const OWNED = 0x80;
/** The count saturates here (anything above 1 is already "shared"). */
const MAX_COUNT = 0x7f;
/** Guest clusters named per shared host cluster in a reason. */
const NAMED = 4;

/** A host cluster refused for writing, and why. */
export interface SharedCluster {
  /** References the metadata makes (saturated at 127). */
  references: number;
  refcount: number;
  /** Some of the active guest clusters mapped onto it (data or table). */
  guests: number[];
  /** Active L1 indexes whose L2 table it is. */
  tables: number[];
}

/** Counts references per host cluster, one byte each, in pages allocated where references land. */
class PagedCounter {
  readonly pages = new Map<number, Uint8Array>();

  add(c: number, owned: boolean): void {
    const p = Math.floor(c / PAGE);
    let page = this.pages.get(p);
    if (page === undefined) {
      page = new Uint8Array(PAGE);
      this.pages.set(p, page);
    }
    const i = c - p * PAGE;
    const v = page[i]!;
    page[i] = (v & OWNED) | (owned ? OWNED : 0) | Math.min(MAX_COUNT, (v & MAX_COUNT) + 1);
  }
}

/** The refcount of cluster `c` (without a promise when its block is loaded); unreadable counts as 0. */
function refcountOf(s: Qcow2State, c: number): number | Promise<number> {
  const refs = s.refcounts;
  const ti = Math.floor(c / refs.perBlock);
  const b = refs.blocks.get(ti);
  if (b !== undefined) return refs.read(b, c % refs.perBlock);
  return refs.getCluster(c).catch(() => 0);
}

/**
 * Counts every reference and compares with the refcounts: the host clusters
 * a write must not touch (usually none), with the guest clusters that use them.
 */
export async function scanShared(s: Qcow2State): Promise<Map<number, SharedCluster>> {
  const counter = new PagedCounter();
  // Metadata clusters: only their use as L2 tables counts here. A data entry pointing into
  // metadata is caught by the overlap check before any write (overlap.ts: marked corrupt).
  const tables = new PagedCounter();
  await countReferences(s, (c, owned, what) => {
    counter.add(c, owned);
    if (what === 'L2 table') tables.add(c, owned);
  });
  const meta = s.w?.meta;
  s.corrupt = false; // a bad entry the walk met is reported by the write that reaches it
  const out = new Map<number, SharedCluster>();
  for (const [p, page] of counter.pages) {
    for (let i = 0; i < PAGE; i++) {
      const c = p * PAGE + i;
      const v = meta?.has(c) ? (tables.pages.get(p)?.[i] ?? 0) : page[i]!;
      if (v === 0) continue;
      const references = v & MAX_COUNT;
      let refcount = refcountOf(s, c);
      if (typeof refcount !== 'number') refcount = await refcount;
      if (references > refcount || ((v & OWNED) !== 0 && references > 1)) {
        out.set(c, { references, refcount, guests: [], tables: [] });
      }
    }
  }
  if (out.size > 0) await nameGuests(s, out);
  return out;
}

/**
 * The host clusters [first, last] L2 entry `j` uses (data, or compressed
 * bytes); undefined for none, or for a bad entry (the write path reports it).
 */
function usedClusters(s: Qcow2State, table: Buffer, j: number, gc: number): [number, number] | undefined {
  try {
    const e = readL2Entry(s, table, j, gc);
    if (e.compressed) return [e.cfirst, e.clast];
    if (e.host !== 0) return [e.host / s.header.clusterSize, e.host / s.header.clusterSize];
  } catch {
    s.corrupt = false;
  }
  return undefined;
}

/** Fills in which active guest clusters (and L1 indexes, for tables) use each shared cluster. */
async function nameGuests(s: Qcow2State, shared: Map<number, SharedCluster>): Promise<void> {
  const h = s.header;
  const cs = h.clusterSize;
  for (let l1i = 0; l1i < h.l1Size; l1i++) {
    const { off } = readL1Entry(s, l1i);
    if (off === 0 || off % cs !== 0 || off + cs > s.file.length()) continue;
    const t = shared.get(off / cs);
    if (t && t.tables.length < NAMED) t.tables.push(l1i);
    const table = s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
    for (let j = 0; j < h.l2Entries; j++) {
      const gc = l1i * h.l2Entries + j;
      const used = usedClusters(s, table, j, gc);
      if (used === undefined) continue;
      for (let c = used[0]; c <= used[1]; c++) {
        const x = shared.get(c);
        if (x && x.guests.length < NAMED && !x.guests.includes(gc)) x.guests.push(gc);
      }
    }
  }
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/** What is refused. */
export type SharedOp = 'write' | 'write-zeroes' | 'discard';

/** The refusal of a write to guest cluster `gc` because of shared host cluster `c`. */
function refusal(s: Qcow2State, op: SharedOp, gc: number, c: number, x: SharedCluster): BlkError {
  const cs = s.header.clusterSize;
  const users =
    x.tables.length > 0
      ? `it is the L2 table of L1 entries ${x.tables.join(', ')}`
      : `guest clusters ${x.guests.join(', ')}${x.references > x.guests.length ? ' (and more)' : ''} use it`;
  return new BlkError(
    'IMAGE_CORRUPT',
    `${op} of guest cluster ${gc} (guest offset ${hex(gc * cs)}) refused: its host cluster at offset ${hex(c * cs)} ` +
      `is referenced ${x.references} times but its refcount is ${x.refcount} (${users}); writing it would ` +
      'change what another reference reads (repair the image with `qemu-img check -r all`)',
    { file: s.path, field: 'l2_entry' },
    { errno: Errno.EIO },
  );
}

/**
 * Throws the refusal when a write, write-zeroes or discard of guest
 * [offset, offset+length) would touch a shared host cluster (data,
 * compressed bytes or L2 table). Free when the scan found none.
 */
export async function refuseShared(
  s: Qcow2State,
  op: SharedOp,
  offset: number,
  length: number,
): Promise<void> {
  const shared = s.w?.shared;
  if (shared === undefined || shared.size === 0 || length <= 0) return;
  const h = s.header;
  const cs = h.clusterSize;
  const lastGc = Math.floor((offset + length - 1) / cs);
  for (let gc = Math.floor(offset / cs); gc <= lastGc; ) {
    const l1i = Math.floor(gc / h.l2Entries);
    const tableLast = Math.min(lastGc, (l1i + 1) * h.l2Entries - 1);
    const { off } = readL1Entry(s, l1i);
    if (off === 0) {
      gc = tableLast + 1;
      continue;
    }
    const t = shared.get(off / cs);
    if (t) throw refusal(s, op, gc, off / cs, t);
    // A bad entry or table offset is left to the write path, which reports it.
    if (off % cs !== 0 || off + cs > s.file.length()) return;
    const table = s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
    for (; gc <= tableLast; gc++) {
      const used = usedClusters(s, table, gc - l1i * h.l2Entries, gc);
      if (used === undefined) continue;
      for (let c = used[0]; c <= used[1]; c++) {
        const x = shared.get(c);
        if (x) throw refusal(s, op, gc, c, x);
      }
    }
  }
}

/** Whether host cluster `c` is shared (the binding must not write it in place, the allocator never hands it out). */
export function isShared(s: Qcow2State, c: number): boolean {
  const shared = s.w?.shared;
  return shared !== undefined && shared.size > 0 && shared.has(c);
}
