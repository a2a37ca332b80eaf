/**
 * Write before acknowledge, with group commit. A request (write,
 * write-zeroes, discard, truncate) resolves only once its data and every
 * metadata change that makes it visible are in the image file (pwritten;
 * durable only after a flush), so a process killed right after the reply
 * loses nothing it acknowledged. needCommit says whether a request must wait
 * for a commit (the overwrite fast path changes nothing and usually waits for
 * nothing); commit() and writeBack() queue the ordered write-back
 * (metadata-cache.ts). One write-back runs at a time; every request made
 * while one runs joins the single one queued behind it (a flush upgrades it
 * to a flush), so concurrent writers share one write-back and its syncs.
 */
import { readL1Entry } from './entries.js';
import { writeBackOnce } from './metadata-cache.js';
import type { Qcow2State } from './state.js';

/** Queued decrements above this many bytes of clusters make the next write-back a flush (bounds space not reused). */
const FREE_LIMIT = 32 * 1024 * 1024;

/** Makes every metadata change durable, then applies the queued refcount decrements (a flush). */
export function writeBack(s: Qcow2State): Promise<void> {
  return request(s, true);
}

/** Puts every metadata change made so far into the file, ordered but not synced (before a write resolves). */
export function commit(s: Qcow2State): Promise<void> {
  return request(s, false);
}

/**
 * What a request on [offset, offset+length) must wait for before it
 * resolves: undefined when every L1 and L2 entry mapping the range is in the
 * file already (the overwrite fast path checks nothing else), else a commit.
 * Called after the request's own changes, so they are included.
 */
export function needCommit(s: Qcow2State, offset: number, length: number): Promise<void> | undefined {
  return entriesInFile(s, offset, length) ? undefined : commit(s);
}

/**
 * True when every L1 and L2 entry mapping guest [offset, offset+length) is in
 * the file already (pwritten) and no resize waits for the header: a write
 * there in place needs no commit before it is acknowledged (also the rule
 * for the FUSE write fast path, map-host.ts).
 */
export function entriesInFile(s: Qcow2State, offset: number, length: number): boolean {
  const w = s.w!;
  const h = s.header;
  if (h.size !== w.diskSize || h.l1TableOffset !== w.diskL1.offset || h.l1Size !== w.diskL1.size) {
    return false; // a resize not in the header yet
  }
  if (w.dirtyL2.size + w.writingL2.size + w.dirtyL1.size + w.writingL1.size === 0) return true;
  const end = offset + length;
  for (let l1i = Math.floor(offset / h.l2Coverage); l1i * h.l2Coverage < end; l1i++) {
    if (w.dirtyL1.has(l1i) || w.writingL1.has(l1i)) return false;
    const off = readL1Entry(s, l1i).off;
    const a = w.dirtyL2.get(off);
    const b = w.writingL2.get(off);
    if (a === undefined && b === undefined) continue;
    if (a === null || b === null) return false;
    const base = l1i * h.l2Entries;
    const first = Math.max(0, Math.floor(offset / h.clusterSize) - base);
    const last = Math.min(h.l2Entries - 1, Math.floor((end - 1) / h.clusterSize) - base);
    if (touches(a, first, last) || touches(b, first, last)) return false;
  }
  return true;
}

/** Whether the set holds an index in [first, last]. */
function touches(set: Set<number> | undefined, first: number, last: number): boolean {
  if (set === undefined) return false;
  if (set.size < last - first + 1) {
    for (const i of set) if (i >= first && i <= last) return true;
    return false;
  }
  for (let i = first; i <= last; i++) if (set.has(i)) return true;
  return false;
}

function request(s: Qcow2State, full: boolean): Promise<void> {
  const w = s.w;
  if (!w) return full ? s.file.flush() : Promise.resolve();
  const q = w.queued;
  if (q !== undefined) {
    if (full) q.full = true;
    return q.promise;
  }
  const prev = w.running;
  const next = { full, promise: Promise.resolve() };
  next.promise = (async () => {
    await prev;
    // From here on the snapshot is still to come: later requests need the next write-back.
    w.queued = undefined;
    const flush = next.full || s.refcounts.deferred.length * s.header.clusterSize >= FREE_LIMIT;
    await writeBackOnce(s, flush);
  })();
  w.queued = next;
  w.running = next.promise.catch(() => undefined);
  return next.promise;
}
