/**
 * The ordered metadata write-back (commit.ts queues it: commits before a
 * write resolves, flushes). Writers change refcount blocks, the refcount
 * table, L2 tables and the L1 table in memory (dirty, pinned in their
 * caches); a write-back puts them in the file. A commit pwrites every change
 * with the syncs the order below needs, no final sync and no refcount
 * decrements; a flush then syncs, applies the queued decrements and syncs.
 *
 * The invariant kept at every instant for what can reach the disk is "on-disk
 * refcounts ≥ on-disk references" (docs/qcow2.md), so a crash can only leak
 * clusters. The kernel may write back any pwritten page at any moment, so a
 * write that depends on an earlier one is issued only after a sync covers
 * that earlier one:
 *
 *   0. snapshot the dirty pages at one instant, with no other writer half-way
 *      through a change (a flush also waits for readers: it takes
 *      decrements): consistent, because in memory a cluster is counted
 *      before any entry points at it and a dropped reference only queues its
 *      decrement;
 *   1. refcount blocks (increments; new blocks), the dirty pages only;
 *   2. refcount table entries naming new blocks (sync first; an entry whose
 *      block is counted by another new block after that block's entry, a
 *      sync apart: entryLevels), or a whole moved table (sync, table, sync,
 *      header switch);
 *   3. L2 tables, the dirty pages only, after a sync when a cluster handed
 *      out so far is not durably counted yet (AllocationPool needed/durable;
 *      a count in a new block is durable only with the table entry naming it)
 *      or when data an entry must not precede (copy-on-write, fill, a reused
 *      cluster, backing data: write.ts writeData) is not synced yet;
 *   4. L1 entries naming new tables, after a sync covering those tables when
 *      they are copies or in reused clusters (a fresh cluster reads as an
 *      empty table), or a whole moved L1 (sync, header switch); the size;
 *   5. flush only: sync; then the queued decrements and the blocks they
 *      changed → sync.
 *
 * Allocation hands out clusters counted ahead (pool.ts), so a commit usually
 * writes counted-ahead refcount pages without waiting and starts a sync in
 * the background; a commit on a fresh image is then L2 (and L1) pwrites and
 * no sync. A phase with nothing to write costs nothing. With lazy refcounts
 * the dirty bit (set and synced before the first table write) stands in for
 * the refcount ordering: a commit writes only L2 and L1 (refcount blocks
 * wait for the flush).
 */
import { BlkError, Errno } from '../../../errors.js';
import { requeue, type Snapshot, takeBlocks, takeSnapshot } from './dirty-pages.js';
import { INCOMPAT_DIRTY } from './header.js';
import { setDirtyBit, writeL1Header, writeRefcountTableHeader, writeSizeHeader } from './header-write.js';
import type { Qcow2State } from './state.js';

async function writeAll(s: Qcow2State, list: [number, Buffer][]): Promise<void> {
  const r = await Promise.allSettled(list.map(([off, buf]) => s.file.write(off, buf)));
  for (const x of r) if (x.status === 'rejected') throw x.reason;
}

/** One write-back: a flush (`full`) or a commit. */
export async function writeBackOnce(s: Qcow2State, full: boolean): Promise<void> {
  const w = s.w!;
  if (!full && s.corrupt) {
    // Nothing more goes into an image found corrupt; the writes waiting here fail.
    throw new BlkError(
      'IMAGE_CORRUPT',
      'the image was found corrupt: its metadata is not written again',
      { file: s.path, field: 'incompatible_features' },
      { errno: Errno.EIO },
    );
  }
  if (full && w.background !== undefined) await w.background;
  // A flush takes decrements: no reader may still use a mapping they drop (rwlock.ts).
  await (full ? w.lock.exclusive() : w.lock.writersOnly());
  let snap: Snapshot;
  try {
    snap = takeSnapshot(s, full);
  } finally {
    w.lock.releaseExclusive();
  }
  try {
    await writeSnapshot(s, snap);
  } catch (e) {
    // Nothing was lost in memory except the dirty marks: put them back so a later write-back retries.
    requeue(s, snap);
    throw e;
  } finally {
    w.writingL2 = new Map();
    w.writingL1 = new Set();
    for (const off of snap.l2Entries.keys()) if (!w.dirtyL2.has(off)) s.l2Cache.unpin(off);
  }
  if (snap.frees.length > 0) await applyFrees(s, snap.frees);
  // Counted-ahead refcounts written but not synced: sync them in the background, nobody waits.
  if (!full && !w.lazy && !s.refcounts.pool.isDurable(w.refsSnapshot) && w.background === undefined) {
    w.background = sync(s)
      .catch(() => undefined)
      .finally(() => {
        w.background = undefined;
      });
  }
}

/**
 * Refcount table entries in the order they may reach the disk. An entry
 * naming a new block B makes B a referenced cluster, so B's own refcount must
 * be reachable on disk first: when the entry of the block that counts B is
 * among these entries too, it goes one level earlier (a sync apart). Blocks
 * that count themselves, or are counted by a block already on disk, are level
 * 0 (the usual case: one level). Entries left in a cycle (each block counted
 * by the other's) cannot be ordered and are written together, last.
 */
export function entryLevels(
  entries: readonly [number, Buffer][],
  perBlock: number,
  clusterSize: number,
): [number, Buffer][][] {
  const pending = new Map(entries);
  const levels: [number, Buffer][][] = [];
  const countedBy = (b: Buffer) =>
    Math.floor(Number(b.readBigUInt64BE(0) & ~0x1ffn) / clusterSize / perBlock);
  while (pending.size > 0) {
    let level = [...pending].filter(([ti, b]) => {
      const dep = countedBy(b);
      return dep === ti || !pending.has(dep);
    });
    if (level.length === 0) level = [...pending];
    for (const [ti] of level) pending.delete(ti);
    levels.push(level);
  }
  return levels;
}

/** Syncs the file; everything written before the call is then covered. */
async function sync(s: Qcow2State): Promise<void> {
  const w = s.w!;
  const g = w.gen;
  const n = w.refsSnapshot;
  await s.file.flush();
  if (g > w.synced) w.synced = g;
  s.refcounts.pool.synced(n);
}

/** Writes a snapshot in dependency order (the phases in the comment at the top). */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
async function writeSnapshot(s: Qcow2State, snap: Snapshot): Promise<void> {
  const w = s.w!;
  const refs = s.refcounts;
  const h = s.header;
  const tablesToWrite = snap.l2.length + snap.l1.length > 0 || snap.l1Moved !== undefined;
  if (w.lazy && tablesToWrite && (h.incompatible & INCOMPAT_DIRTY) === 0n) await setDirtyBit(s, true);
  const refsUnsynced = () => !w.lazy && w.refsAt > w.synced;
  // Entries may name a cluster only once its refcount is durable (counted-ahead clusters usually are),
  // and a count in a new block is durable only once the table entry naming the block is.
  const countsNeeded = () => !w.lazy && (refs.pool.behind || w.entriesAt > w.synced);

  // 1-2. Refcounts.
  if (snap.blocks.length > 0) {
    await writeAll(s, snap.blocks);
    w.refsAt = ++w.gen;
    w.refsSnapshot = snap.blocksN;
  }
  if (snap.entries.length > 0) {
    // A table entry may name a new block: the block goes first. A new block counted by another new
    // block goes after that block's entry (entryLevels), each level synced before the next.
    const levels = entryLevels(snap.entries, refs.perBlock, h.clusterSize);
    for (const level of levels) {
      if (refsUnsynced()) await sync(s);
      await writeAll(
        s,
        level.map(([ti, b]) => [refs.diskTable.offset + ti * 8, b]),
      );
      w.refsAt = w.entriesAt = ++w.gen;
    }
  }
  if (snap.table) {
    const t = snap.table;
    if (refsUnsynced()) await sync(s);
    await s.file.write(t.offset, t.buf);
    w.refsAt = ++w.gen;
    await sync(s);
    await writeRefcountTableHeader(s, t.offset, t.clusters);
    refs.diskTable = { offset: t.offset, clusters: t.clusters };
    for (const m of s.metadata) {
      if (m[0] === 'refcount table') {
        m[1] = t.offset;
        m[2] = t.offset + t.clusters * h.clusterSize;
      }
    }
  }

  // 3. L2 tables: no entry before its cluster's refcount and the data it needs first.
  if (snap.l2.length > 0) {
    if (countsNeeded() || snap.dataAt > w.synced) await sync(s);
    await writeAll(s, snap.l2);
    if (snap.ordered.length > 0) w.l2At = ++w.gen;
    else ++w.gen;
  }

  // 4. L1: no entry before the table it names.
  const tablesUnsynced = () => w.l2At > w.synced || countsNeeded();
  if (snap.l1Moved) {
    const m = snap.l1Moved;
    if (tablesUnsynced()) await sync(s);
    await s.file.write(m.offset, m.buf);
    await sync(s);
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
  } else if (snap.l1.length > 0) {
    if (tablesUnsynced()) await sync(s);
    await writeAll(s, snap.l1);
    ++w.gen;
  }
  if (snap.size !== undefined) {
    if (w.gen > w.synced) await sync(s);
    await writeSizeHeader(s, snap.size);
    w.diskSize = snap.size;
  }

  // 5. A flush makes it all durable.
  if (snap.full) await sync(s);
}

/** Every reference to these clusters is gone on disk (synced): lower their refcounts, write and sync. */
async function applyFrees(s: Qcow2State, frees: number[]): Promise<void> {
  const w = s.w!;
  const refs = s.refcounts;
  const cs = s.header.clusterSize;
  for (const c of frees) {
    const v = await refs.adjust(c, -1);
    if (v === 0) {
      w.meta.delete(c);
      s.l2Cache.drop(c * cs);
    }
  }
  const taken: [number, Set<number>][] = [];
  const blocks = takeBlocks(s, taken);
  try {
    await writeAll(s, blocks.writes);
    w.refsAt = ++w.gen;
    w.refsSnapshot = blocks.n;
    await sync(s);
  } catch (e) {
    for (const [ti, pages] of taken) for (const p of pages) refs.markDirty(ti, p);
    throw e;
  }
}
