/**
 * The dirty metadata pages, taken for a write-back as one consistent cut
 * (metadata-cache.ts writes it in order), and put back when writing fails.
 *
 * Writers mark what they change: refcount block pages (Refcounts.markDirty),
 * refcount table entries, L2 entries (markL2Dirty: single entries, or a
 * whole new or copied table) and L1 entries. Only those pages are copied and
 * written — a commit after every allocating write must not rewrite whole
 * 64 KiB tables — in runs that swallow short clean gaps, since one pwrite
 * costs more than a few more pages copied. Taken L2 and L1 marks stay
 * visible as "being written" (writingL2/writingL1) until the write-back ends:
 * a request touching them is not in the file yet either (commit.ts).
 */
import { type DirtyEntries, type Qcow2State, TABLE_PAGE } from './state.js';
import { markL2Dirty } from './write.js';

/** Clean pages between two dirty ones written along rather than splitting the write (a 64 KiB table is one write). */
const MERGE_GAP = 14;

export interface Snapshot {
  full: boolean;
  blocks: [number, Buffer][];
  blockPages: [number, Set<number>][];
  /** The block snapshot's number. */
  blocksN: number;
  entries: [number, Buffer][];
  table: { offset: number; clusters: number; buf: Buffer } | undefined;
  l2: [number, Buffer][];
  l2Entries: DirtyEntries;
  /** Tables of l2Entries in orderedL2. */
  ordered: number[];
  l1: [number, Buffer][];
  l1Entries: Set<number>;
  l1Moved: { offset: number; size: number; buf: Buffer } | undefined;
  size: number | undefined;
  frees: number[];
  /** The last allocating data write before the snapshot. */
  dataAt: number;
}

/**
 * Dirty pages of `src` (page indexes) as [offset + first byte, copy of the
 * bytes] writes: runs of pages, with gaps of up to MERGE_GAP clean pages
 * written along (one pwrite costs more than a few more pages copied).
 */
function pageRuns(
  offset: number,
  src: Buffer,
  pages: Set<number>,
  page: number,
  out: [number, Buffer][],
): void {
  const sorted = [...pages].sort((a, b) => a - b);
  for (let i = 0; i < sorted.length; ) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1]! - sorted[j]! <= MERGE_GAP + 1) j++;
    const from = sorted[i]! * page;
    const to = Math.min(src.length, (sorted[j]! + 1) * page);
    out.push([offset + from, Buffer.from(src.subarray(from, to))]);
    i = j + 1;
  }
}

/**
 * The dirty pages of the refcount blocks, as writes (a block snapshot:
 * AllocationPool.takeSnapshot); `taken` records them (to put them back on failure).
 */
export function takeBlocks(
  s: Qcow2State,
  taken: [number, Set<number>][],
): { n: number; writes: [number, Buffer][] } {
  const refs = s.refcounts;
  const n = refs.pool.takeSnapshot();
  const out: [number, Buffer][] = [];
  for (const [ti, pages] of refs.dirtyBlocks) {
    pageRuns(refs.blockOffset(ti), refs.blocks.get(ti)!, pages, refs.page, out);
    taken.push([ti, pages]);
  }
  refs.dirtyBlocks.clear();
  return { n, writes: out };
}

/** Takes every dirty table page at this instant (the caller holds the lock against other writers). */
export function takeSnapshot(s: Qcow2State, full: boolean): Snapshot {
  const w = s.w!;
  const h = s.header;
  const snap: Snapshot = {
    full,
    blocks: [],
    blockPages: [],
    blocksN: 0,
    entries: [],
    table: undefined,
    l2: [],
    l2Entries: w.dirtyL2,
    ordered: [],
    l1: [],
    l1Entries: w.dirtyL1,
    l1Moved: undefined,
    size: h.size !== w.diskSize ? h.size : undefined,
    frees: [],
    dataAt: w.dataAt,
  };
  // With lazy refcounts a commit leaves the refcount structures to the flush.
  if (full || !w.lazy) takeRefcounts(s, snap);
  takeL2(s, snap);
  takeL1(s, snap);
  if (full) {
    snap.frees = s.refcounts.deferred;
    s.refcounts.deferred = [];
  }
  return snap;
}

function takeRefcounts(s: Qcow2State, snap: Snapshot): void {
  const refs = s.refcounts;
  const b = takeBlocks(s, snap.blockPages);
  snap.blocks = b.writes;
  snap.blocksN = b.n;
  if (refs.tableOffset !== refs.diskTable.offset) {
    snap.table = { offset: refs.tableOffset, clusters: refs.tableClusters, buf: Buffer.from(refs.table) };
  } else {
    for (const ti of refs.dirtyEntries)
      snap.entries.push([ti, Buffer.from(refs.table.subarray(ti * 8, ti * 8 + 8))]);
  }
  refs.dirtyEntries.clear();
}

/** The dirty pages of the L2 tables; they stay "being written" (writingL2) until the write-back ends. */
function takeL2(s: Qcow2State, snap: Snapshot): void {
  const w = s.w!;
  const h = s.header;
  const page = Math.min(TABLE_PAGE, h.clusterSize);
  for (const [off, entries] of w.dirtyL2) {
    const t = s.l2Cache.peek(off);
    if (t === undefined) continue;
    if (w.orderedL2.delete(off)) snap.ordered.push(off);
    const pages = new Set<number>();
    if (entries === null) for (let p = 0; p < h.clusterSize / page; p++) pages.add(p);
    else for (const i of entries) pages.add(Math.floor((i * h.l2EntryBytes) / page));
    pageRuns(off, t, pages, page, snap.l2);
  }
  w.writingL2 = w.dirtyL2;
  w.dirtyL2 = new Map();
}

/** The dirty 512-byte sectors of the L1 table, or the whole table when it moved. */
function takeL1(s: Qcow2State, snap: Snapshot): void {
  const w = s.w!;
  const h = s.header;
  if (h.l1TableOffset !== w.diskL1.offset || h.l1Size !== w.diskL1.size) {
    snap.l1Moved = {
      offset: h.l1TableOffset,
      size: h.l1Size,
      buf: Buffer.from(s.l1.subarray(0, h.l1Size * 8)),
    };
  } else {
    const sectors = new Set<number>();
    for (const i of w.dirtyL1) sectors.add(Math.floor(i / 64));
    for (const sec of sectors) {
      const from = sec * 512;
      const to = Math.min(from + 512, h.l1Size * 8);
      snap.l1.push([h.l1TableOffset + from, Buffer.from(s.l1.subarray(from, to))]);
    }
  }
  w.writingL1 = w.dirtyL1;
  w.dirtyL1 = new Set();
}

/** Puts a snapshot's dirty marks back (its writes failed), so a later write-back retries them. */
export function requeue(s: Qcow2State, snap: Snapshot): void {
  const w = s.w!;
  const refs = s.refcounts;
  for (const [ti, pages] of snap.blockPages) for (const p of pages) refs.markDirty(ti, p);
  for (const [ti] of snap.entries) refs.dirtyEntries.add(ti);
  for (const [off, entries] of snap.l2Entries) {
    if (entries === null) markL2Dirty(s, off);
    else for (const i of entries) markL2Dirty(s, off, i);
  }
  for (const off of snap.ordered) w.orderedL2.add(off);
  for (const i of snap.l1Entries) w.dirtyL1.add(i);
  refs.deferred.push(...snap.frees);
}
