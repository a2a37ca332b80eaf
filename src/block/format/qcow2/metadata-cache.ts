/**
 * Metadata write-back with dependency ordering.
 *
 * Writers change refcount blocks, the refcount table, L2 tables and the L1
 * table in memory only (dirty, pinned in their caches); a flush, an eviction
 * bound or a close writes them back. The invariant kept at every instant is
 * "on-disk refcounts ≥ on-disk references" (docs/qcow2.md), so a crash can
 * only leak clusters:
 *
 *   0. snapshot every dirty table at one instant (exclusive lock): the
 *      snapshot is consistent because in memory a cluster is counted before
 *      any entry points at it, and a dropped reference only queues its
 *      decrement;
 *   1. refcount blocks (increments; new blocks) → sync;
 *   2. refcount table entries naming new blocks (or a whole moved table, then
 *      the header switch) → sync;
 *   3. L2 tables (new ones before the L1 entries naming them) → sync;
 *   4. L1 entries (or a whole moved L1, then the header switch) and the
 *      virtual size → sync;
 *   5. only now apply the queued decrements and write those blocks → sync.
 *
 * Data writes are never synced on their own: the first sync of a flush makes
 * every data write that completed before it durable, before any entry that
 * points at new data reaches the disk. A phase with nothing to write costs
 * no sync. With lazy refcounts the dirty bit (set and synced before the
 * first table write) stands in for the ordering, and only the last sync runs.
 */
import { INCOMPAT_DIRTY } from './header.js';
import { setDirtyBit, writeL1Header, writeRefcountTableHeader, writeSizeHeader } from './header-write.js';
import type { Qcow2State } from './state.js';

interface Snapshot {
  blocks: [number, Buffer][];
  entries: [number, Buffer][];
  table: { offset: number; clusters: number; buf: Buffer } | undefined;
  l2: [number, Buffer][];
  l1: [number, Buffer][];
  l1Moved: { offset: number; size: number; buf: Buffer } | undefined;
  size: number | undefined;
  frees: number[];
}

/** Writes every dirty table back in dependency order and syncs (a flush). */
export async function writeBack(s: Qcow2State): Promise<void> {
  const w = s.w;
  if (!w) {
    await s.file.flush();
    return;
  }
  const prev = w.chain;
  let release!: () => void;
  w.chain = new Promise((r) => {
    release = r;
  });
  try {
    await prev;
    await writeBackOnce(s);
  } finally {
    release();
  }
}

function takeBlocks(s: Qcow2State): [number, Buffer][] {
  const refs = s.refcounts;
  const out: [number, Buffer][] = [];
  for (const ti of refs.dirtyBlocks) out.push([refs.blockOffset(ti), Buffer.from(refs.blocks.get(ti)!)]);
  refs.dirtyBlocks.clear();
  return out;
}

function snapshot(s: Qcow2State): Snapshot {
  const w = s.w!;
  const refs = s.refcounts;
  const h = s.header;
  const blocks = takeBlocks(s);
  let table: Snapshot['table'];
  const entries: [number, Buffer][] = [];
  if (refs.tableOffset !== refs.diskTable.offset) {
    table = { offset: refs.tableOffset, clusters: refs.tableClusters, buf: Buffer.from(refs.table) };
  } else {
    for (const ti of refs.dirtyEntries)
      entries.push([ti, Buffer.from(refs.table.subarray(ti * 8, ti * 8 + 8))]);
  }
  refs.dirtyEntries.clear();
  const l2: [number, Buffer][] = [];
  for (const off of w.dirtyL2) {
    const t = s.l2Cache.peek(off);
    if (t !== undefined) l2.push([off, Buffer.from(t)]);
  }
  w.dirtyL2.clear();
  w.dirtyBytes = 0;
  let l1Moved: Snapshot['l1Moved'];
  const l1: [number, Buffer][] = [];
  if (h.l1TableOffset !== w.diskL1.offset || h.l1Size !== w.diskL1.size) {
    l1Moved = { offset: h.l1TableOffset, size: h.l1Size, buf: Buffer.from(s.l1.subarray(0, h.l1Size * 8)) };
  } else {
    // Whole 512-byte sectors of the L1 table, each written once.
    const sectors = new Set<number>();
    for (const i of w.dirtyL1) sectors.add(Math.floor(i / 64));
    for (const sec of sectors) {
      const from = sec * 512;
      const to = Math.min(from + 512, h.l1Size * 8);
      l1.push([h.l1TableOffset + from, Buffer.from(s.l1.subarray(from, to))]);
    }
  }
  w.dirtyL1.clear();
  const frees = refs.deferred;
  refs.deferred = [];
  return { blocks, entries, table, l2, l1, l1Moved, size: h.size !== w.diskSize ? h.size : undefined, frees };
}

async function writeAll(s: Qcow2State, list: [number, Buffer][]): Promise<void> {
  const r = await Promise.allSettled(list.map(([off, buf]) => s.file.write(off, buf)));
  for (const x of r) if (x.status === 'rejected') throw x.reason;
}

// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
async function writeBackOnce(s: Qcow2State): Promise<void> {
  const w = s.w!;
  const refs = s.refcounts;
  const h = s.header;
  await w.lock.exclusive();
  let snap: Snapshot;
  try {
    snap = snapshot(s);
  } finally {
    w.lock.releaseExclusive();
  }
  const tablesToWrite = snap.l2.length + snap.l1.length > 0 || snap.l1Moved !== undefined;
  if (w.lazy && tablesToWrite && (h.incompatible & INCOMPAT_DIRTY) === 0n) await setDirtyBit(s, true);
  // With lazy refcounts the dirty bit covers every ordering: one sync at the end.
  const order = w.lazy ? async () => {} : () => s.file.flush();
  let unsynced = false;
  const phase = async (work: () => Promise<void>) => {
    if (unsynced) await order();
    await work();
    unsynced = true;
  };
  try {
    if (snap.blocks.length > 0) await phase(() => writeAll(s, snap.blocks));
    if (snap.entries.length > 0) {
      await phase(() =>
        writeAll(
          s,
          snap.entries.map(([ti, b]) => [refs.diskTable.offset + ti * 8, b]),
        ),
      );
    }
    if (snap.table) {
      const t = snap.table;
      await phase(() => s.file.write(t.offset, t.buf));
      await s.file.flush();
      await writeRefcountTableHeader(s, t.offset, t.clusters);
      refs.diskTable = { offset: t.offset, clusters: t.clusters };
      for (const m of s.metadata) {
        if (m[0] === 'refcount table') {
          m[1] = t.offset;
          m[2] = t.offset + t.clusters * h.clusterSize;
        }
      }
      unsynced = false;
    }
    if (snap.l2.length > 0) await phase(() => writeAll(s, snap.l2));
    if (snap.l1Moved) {
      const m = snap.l1Moved;
      await phase(() => s.file.write(m.offset, m.buf));
      await s.file.flush();
      await writeL1Header(s, m.offset, m.size);
      w.diskL1 = { offset: m.offset, size: m.size };
      const l1Area = s.metadata.find((x) => x[0] === 'L1 table');
      const l1End = m.offset + Math.ceil((m.size * 8) / h.clusterSize) * h.clusterSize;
      if (l1Area) {
        l1Area[1] = m.offset;
        l1Area[2] = l1End;
      } else {
        s.metadata.push(['L1 table', m.offset, l1End]);
      }
      unsynced = false;
    } else if (snap.l1.length > 0) {
      await phase(() => writeAll(s, snap.l1));
    }
    if (snap.size !== undefined) {
      if (unsynced) await s.file.flush();
      await writeSizeHeader(s, snap.size);
      w.diskSize = snap.size;
      unsynced = false;
    }
    await s.file.flush();
    unsynced = false;
  } catch (e) {
    // Nothing was lost in memory except the dirty marks: put them back so a later flush retries.
    requeue(s, snap);
    throw e;
  } finally {
    for (const [off] of snap.l2) if (!w.dirtyL2.has(off)) s.l2Cache.unpin(off);
  }

  // Every reference that was dropped is gone on disk now: lower the refcounts.
  if (snap.frees.length > 0) {
    const cs = h.clusterSize;
    for (const c of snap.frees) {
      const v = await refs.adjust(c, -1);
      if (v === 0) {
        w.meta.delete(c);
        s.l2Cache.drop(c * cs);
      }
    }
    await writeAll(s, takeBlocks(s));
    await s.file.flush();
  }
}

function requeue(s: Qcow2State, snap: Snapshot): void {
  const w = s.w!;
  const refs = s.refcounts;
  for (const [off] of snap.blocks) {
    for (let ti = 0; ti < refs.entries; ti++) if (refs.blockOffset(ti) === off) refs.dirtyBlocks.add(ti);
  }
  for (const [ti] of snap.entries) refs.dirtyEntries.add(ti);
  for (const [off] of snap.l2) {
    w.dirtyL2.add(off);
    s.l2Cache.pin(off);
  }
  for (const [off] of snap.l1) {
    const first = (off - s.header.l1TableOffset) / 8;
    for (let i = first; i < first + 64 && i < s.header.l1Size; i++) w.dirtyL1.add(i);
  }
  refs.deferred.push(...snap.frees);
}
