/**
 * The qcow2 write path.
 *
 * Overwriting clusters that are allocated with COPIED set (refcount 1) is
 * the fast path: under the shared lock, one pwrite per host-contiguous run,
 * no metadata I/O. Everything else takes the exclusive lock and goes through
 * `writeAllocating`: per L2 table, the table is made writable (allocated, or
 * copied when shared with a snapshot), the clusters needing a new home are
 * allocated in one batch, partial clusters are filled with what the guest
 * currently reads there (backing file, zeroes, compressed or shared data:
 * copy-on-write), the data is written, and only then do the L2 entries point
 * at it. The old clusters' refcounts are dropped later, after the new entries
 * are on disk (metadata-cache.ts). A write resolves only once every entry
 * mapping it is in the file too (a commit, shared by concurrent writers).
 *
 * Longer than our other files on purpose: the allocating write, copy-on-write
 * and the order that keeps the image crash-safe read best as one piece.
 */
import { BlkError, Errno } from '../../../errors.js';
import { needCommit } from './commit.js';
import {
  ALL_SUBCLUSTERS,
  type L2Entry,
  readL1Entry,
  readL2Entry,
  subclusterBits,
  writeL1Entry,
  writeL2Entry,
} from './entries.js';
import { l2TableOffset } from './mapping.js';
import { checkNoOverlap } from './overlap.js';
import { readGuest } from './read.js';
import { refuseShared } from './shared.js';
import type { Qcow2State } from './state.js';

/** Host-contiguous pieces are merged into one pwrite up to this size. */
const MERGE_LIMIT = 4 * 1024 * 1024;

/** How one cluster of a write is carried out. */
const DIRECT = 0; // allocated, COPIED, every touched part allocated: write in place
const FILL = 1; // allocated and COPIED, but the touched part reads as zero or unallocated: fill, then write in place
const MOVE = 2; // needs a new cluster (unallocated, zero, compressed, shared)

interface Plan {
  gc: number;
  idx: number;
  e: L2Entry;
  mode: typeof DIRECT | typeof FILL | typeof MOVE;
  /** Write range inside the cluster. */
  ws: number;
  we: number;
  /** Range of the host cluster written (write range widened to what must be materialized). */
  a: number;
  b: number;
  target: number;
  /** The target cluster was never used: zeroes need not be written there. */
  fresh: boolean;
}

/** Refuses writes on an image found corrupt. */
export function checkNotCorrupt(s: Qcow2State): void {
  if (s.corrupt) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      'the image was found corrupt: it is not written again',
      { file: s.path, field: 'incompatible_features' },
      { errno: Errno.EIO },
    );
  }
}

/**
 * Writes `buf` at guest `offset`. It resolves only once the data and every
 * entry mapping it are in the file (pwritten; a commit, shared with
 * concurrent writers, when metadata changed or is still on its way).
 */
export async function writeGuest(s: Qcow2State, offset: number, buf: Buffer): Promise<void> {
  checkNotCorrupt(s);
  const w = s.w!;
  if (w.shared.size > 0) await refuseShared(s, 'write', offset, buf.length);
  if (w.lock.tryShared()) {
    let done: boolean;
    try {
      done = await writeInPlace(s, offset, buf);
    } finally {
      w.lock.releaseShared();
    }
    if (done) {
      const pending = needCommit(s, offset, buf.length);
      if (pending !== undefined) await pending;
      return;
    }
  }
  await writeUnlocked(s, offset, buf);
  const pending = needCommit(s, offset, buf.length);
  if (pending !== undefined) await pending;
}

/**
 * The slow path with the data I/O outside the lock: plan and allocate under
 * the exclusive lock, mark the guest clusters in flight, write the data
 * unlocked (other allocating writes proceed meanwhile), then point the
 * entries at it. Requests touching an in-flight cluster wait for it.
 */
async function writeUnlocked(s: Qcow2State, offset: number, buf: Buffer): Promise<void> {
  const w = s.w!;
  const cs = s.header.clusterSize;
  const first = Math.floor(offset / cs);
  const last = Math.floor((offset + buf.length - 1) / cs);
  for (;;) {
    await w.lock.exclusive();
    let busy: Promise<void> | undefined;
    for (let gc = first; gc <= last && busy === undefined; gc++) busy = w.inflight.get(gc);
    if (busy === undefined) break;
    w.lock.releaseExclusive();
    await busy;
  }
  let finish!: () => void;
  const done = new Promise<void>((r) => {
    finish = r;
  });
  let tables: TablePlan[];
  try {
    checkNotCorrupt(s);
    tables = await planWrite(s, offset, buf.length);
    for (let gc = first; gc <= last; gc++) w.inflight.set(gc, done);
  } catch (e) {
    finish();
    throw e;
  } finally {
    w.lock.releaseExclusive();
  }
  try {
    for (const t of tables) await writeData(s, t, offset, buf);
    for (const t of tables) await commitEntries(s, t);
  } finally {
    for (let gc = first; gc <= last; gc++) if (w.inflight.get(gc) === done) w.inflight.delete(gc);
    finish();
  }
}

/** Takes the exclusive lock with no allocating write in flight (zeroing, discard, resize). */
export async function exclusiveQuiet(s: Qcow2State): Promise<void> {
  const w = s.w!;
  for (;;) {
    await w.lock.exclusive();
    const busy = w.inflight.values().next();
    if (busy.done) return;
    w.lock.releaseExclusive();
    await busy.value;
  }
}

/** The fast path: true when every cluster was allocated with COPIED (and the data is written), false to take the slow path. */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
async function writeInPlace(s: Qcow2State, offset: number, buf: Buffer): Promise<boolean> {
  const h = s.header;
  const cs = h.clusterSize;
  const end = offset + buf.length;
  const fileEnd = s.file.length();
  const inflight = s.w!.inflight;
  const pieces: [number, number, number][] = []; // host, from, to (in buf)
  let pos = offset;
  while (pos < end) {
    const l1i = Math.floor(pos / h.l2Coverage);
    const { off, copied } = readL1Entry(s, l1i);
    if (off === 0 || !copied) return false;
    l2TableOffset(s, l1i); // checks the entry
    const table = s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
    const tEnd = Math.min(end, (l1i + 1) * h.l2Coverage);
    while (pos < tEnd) {
      const gc = Math.floor(pos / cs);
      const cEnd = Math.min(tEnd, (gc + 1) * cs);
      // A cluster an allocating write is filling goes through the slow path (it waits there).
      if (inflight.size > 0 && inflight.has(gc)) return false;
      const e = readL2Entry(s, table, gc - l1i * h.l2Entries, gc);
      if (e.compressed || e.host === 0 || !e.copied || e.zero) return false;
      const ws = pos - gc * cs;
      const we = cEnd - gc * cs;
      if (h.extendedL2) {
        const bits = subclusterBits(
          Math.floor(ws / h.subclusterSize),
          Math.floor((we - 1) / h.subclusterSize),
        );
        if ((e.allocMask & bits) !== bits) return false;
      }
      if (e.host + we > fileEnd) return false;
      const host = e.host + ws;
      const last = pieces[pieces.length - 1];
      if (last && last[0] + (last[2] - last[1]) === host) last[2] = cEnd - offset;
      else pieces.push([host, pos - offset, cEnd - offset]);
      pos = cEnd;
    }
  }
  for (const [host, from, to] of pieces) checkNoOverlap(s, host, to - from);
  if (pieces.length === 1) {
    await s.file.write(pieces[0]![0], buf);
    return true;
  }
  await settleAll(pieces.map(([host, from, to]) => s.file.write(host, buf.subarray(from, to))));
  return true;
}

let zeroes = Buffer.alloc(0);

function isZero(b: Buffer): boolean {
  if (zeroes.length < b.length) zeroes = Buffer.alloc(Math.max(b.length, 65536));
  return b.equals(zeroes.subarray(0, b.length));
}

/** Waits for every promise, then throws the first failure (nothing may still be writing when we return). */
async function settleAll(jobs: Promise<void>[]): Promise<void> {
  const r = await Promise.allSettled(jobs);
  for (const x of r) if (x.status === 'rejected') throw x.reason;
}

/** The L2 table for L1 index `l1i`, made writable: allocated when missing, copied when shared. */
export async function l2ForWrite(s: Qcow2State, l1i: number): Promise<Buffer> {
  const w = s.w!;
  const cs = s.header.clusterSize;
  const { off, copied } = readL1Entry(s, l1i);
  if (off !== 0) l2TableOffset(s, l1i);
  if (off !== 0 && copied) {
    const t = s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
    return t;
  }
  const old = off === 0 ? undefined : (s.l2Cache.peek(off) ?? (await s.l2Cache.get(off)));
  const run = await s.refcounts.allocate(1);
  const newOff = run.start * cs;
  w.meta.add(run.start);
  const table = old ? Buffer.from(old) : Buffer.alloc(cs);
  s.l2Cache.put(newOff, table);
  markL2Dirty(s, newOff);
  // A zero cluster on disk reads as an empty table: only a copy, or a table in a reused
  // cluster, must be durable before the L1 entry names it.
  if (off !== 0 || !run.fresh) w.orderedL2.add(newOff);
  writeL1Entry(s, l1i, newOff, true);
  // A shared table keeps its other references (snapshots); this one goes once the new L1 entry is on disk.
  if (off !== 0) s.refcounts.deferred.push(off / cs);
  return table;
}

/**
 * Marks the L2 table at `off` dirty (pinned in the cache until written back):
 * entry `idx`, or the whole table (a new or copied one).
 */
export function markL2Dirty(s: Qcow2State, off: number, idx?: number): void {
  const w = s.w!;
  const now = w.dirtyL2.get(off);
  if (now === undefined) {
    s.l2Cache.pin(off);
    w.dirtyL2.set(off, idx === undefined ? null : new Set([idx]));
  } else if (now !== null) {
    if (idx === undefined) w.dirtyL2.set(off, null);
    else now.add(idx);
  }
}

/** Queues the refcount drop of the host clusters an entry used (after the entry is replaced on disk). */
export function freeEntryClusters(s: Qcow2State, e: L2Entry): void {
  const cs = s.header.clusterSize;
  if (e.compressed) {
    for (let c = e.cfirst; c <= e.clast; c++) s.refcounts.deferred.push(c);
  } else if (e.host !== 0) {
    s.refcounts.deferred.push(e.host / cs);
  }
}

/** The clusters of one L2 table a write touches, and how each is written. */
interface TablePlan {
  l1i: number;
  plans: Plan[];
}

/** The whole slow path with the exclusive lock (and quiet) already held: used by write-zeroes. */
export async function writeAllocating(s: Qcow2State, offset: number, buf: Buffer): Promise<void> {
  const tables = await planWrite(s, offset, buf.length);
  for (const t of tables) await writeData(s, t, offset, buf);
  for (const t of tables) await commitEntries(s, t);
}

/** Plans every cluster of [offset, offset+length): tables made writable, new clusters allocated (lock held). */
async function planWrite(s: Qcow2State, offset: number, length: number): Promise<TablePlan[]> {
  const h = s.header;
  const end = offset + length;
  const out: TablePlan[] = [];
  let pos = offset;
  while (pos < end) {
    const l1i = Math.floor(pos / h.l2Coverage);
    const tEnd = Math.min(end, (l1i + 1) * h.l2Coverage);
    out.push({ l1i, plans: await planTable(s, l1i, pos, tEnd) });
    pos = tEnd;
  }
  return out;
}

// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
async function planTable(s: Qcow2State, l1i: number, pos: number, tEnd: number): Promise<Plan[]> {
  const h = s.header;
  const cs = h.clusterSize;
  const sub = h.subclusterSize;
  const table = await l2ForWrite(s, l1i);
  const plans: Plan[] = [];
  let needNew = 0;
  for (let gc = Math.floor(pos / cs); gc * cs < tEnd; gc++) {
    const idx = gc - l1i * h.l2Entries;
    const e = readL2Entry(s, table, idx, gc);
    const ws = Math.max(pos, gc * cs) - gc * cs;
    const we = Math.min(tEnd, (gc + 1) * cs) - gc * cs;
    const owned = !e.compressed && e.host !== 0 && e.copied;
    let mode: Plan['mode'];
    let a = 0;
    let b = cs;
    if (h.extendedL2) {
      const first = Math.floor(ws / sub);
      const last = Math.floor((we - 1) / sub);
      const bits = subclusterBits(first, last);
      if (owned && (e.allocMask & bits) === bits) mode = DIRECT;
      else if (owned) mode = FILL;
      else mode = MOVE;
      // A new cluster for an unallocated or zero one only needs the touched subclusters;
      // moving away from a compressed or shared cluster materializes all of it.
      if (mode !== MOVE || (!e.compressed && e.host === 0)) {
        a = first * sub;
        b = (last + 1) * sub;
      }
    } else {
      mode = owned && !e.zero ? DIRECT : owned ? FILL : MOVE;
    }
    if (mode === DIRECT) {
      a = ws;
      b = we;
    }
    if (mode === MOVE) needNew++;
    plans.push({ gc, idx, e, mode, ws, we, a, b, target: owned ? e.host : 0, fresh: false });
  }

  // One allocation batch for every cluster that needs a new home (contiguous when the space allows).
  let next = 0;
  while (needNew > 0) {
    const run = await s.refcounts.allocate(needNew);
    for (let i = 0; i < run.count; i++) {
      while (plans[next]!.mode !== MOVE) next++;
      plans[next]!.target = (run.start + i) * cs;
      plans[next]!.fresh = run.fresh;
      next++;
    }
    needNew -= run.count;
  }
  return plans;
}

/** Writes the data of one table's clusters: the new bytes, widened with what the guest reads now where a cluster must be materialized. */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
async function writeData(s: Qcow2State, t: TablePlan, offset: number, buf: Buffer): Promise<void> {
  const cs = s.header.clusterSize;
  const pieces: [number, Buffer][] = [];
  let maxEnd = 0;
  let ordered = false;
  for (const p of t.plans) {
    const guest = p.gc * cs;
    let data: Buffer;
    if (p.a === p.ws && p.b === p.we) {
      data = buf.subarray(guest + p.ws - offset, guest + p.we - offset);
    } else {
      data = Buffer.allocUnsafe(p.b - p.a);
      const jobs: Promise<void>[] = [];
      if (p.ws > p.a) jobs.push(readGuest(s, guest + p.a, data.subarray(0, p.ws - p.a)));
      if (p.b > p.we) jobs.push(readGuest(s, guest + p.we, data.subarray(p.we - p.a)));
      await settleAll(jobs);
      buf.copy(data, p.ws - p.a, guest + p.ws - offset, guest + p.we - offset);
    }
    let host = p.target + p.a;
    if (p.fresh) {
      // A never-used cluster already reads as zeroes: leave out zero head and tail fill.
      let lo = 0;
      let hi = data.length;
      if (p.ws > p.a && isZero(data.subarray(0, p.ws - p.a))) lo = p.ws - p.a;
      if (p.b > p.we && isZero(data.subarray(p.we - p.a))) hi = p.we - p.a;
      data = data.subarray(lo, hi);
      host += lo;
    }
    // The new entry must not reach the disk before this data (a sync between them,
    // metadata-cache.ts) unless the cluster was never used, gets only the guest's new bytes
    // and the range read as zeroes before: then, after a power loss, it reads as the old
    // bytes (zeroes) or the new ones. A copy-on-write, a fill, a reused cluster or backing
    // data would show bytes that are neither.
    const own = p.fresh && host === p.target + p.ws && data.length === p.we - p.ws;
    if (p.mode !== DIRECT && !(own && readZeroBefore(s, p))) ordered = true;
    maxEnd = Math.max(maxEnd, host + data.length);
    const last = pieces[pieces.length - 1];
    if (last && last[0] + last[1].length === host && last[1].length + data.length <= MERGE_LIMIT) {
      const prev = last[1];
      // Consecutive slices of the caller's buffer merge without a copy.
      last[1] =
        prev.buffer === data.buffer && prev.byteOffset + prev.length === data.byteOffset
          ? Buffer.from(prev.buffer, prev.byteOffset, prev.length + data.length)
          : Buffer.concat([prev, data]);
    } else {
      pieces.push([host, data]);
    }
  }
  for (const [host, data] of pieces) checkNoOverlap(s, host, data.length);
  if (maxEnd > s.file.length()) await s.refcounts.hooks!.grow(maxEnd);
  await settleAll(pieces.map(([host, data]) => s.file.write(host, data)));
  if (ordered) {
    const w = s.w!;
    w.dataAt = ++w.gen;
  }
}

/** Whether the guest read zeroes in the plan's range [a, b) before the write (unallocated without backing, or zero). */
function readZeroBefore(s: Qcow2State, p: Plan): boolean {
  const e = p.e;
  if (e.compressed || e.host !== 0) return false;
  if (s.backing === null) return true;
  if (s.header.extendedL2) {
    const sub = s.header.subclusterSize;
    const bits = subclusterBits(Math.floor(p.a / sub), Math.floor((p.b - 1) / sub));
    return (e.zeroMask & bits) === bits;
  }
  return e.zero;
}

/** Points the entries at the written data and queues the old clusters' refcount drops (synchronous once the table is at hand). */
async function commitEntries(s: Qcow2State, t: TablePlan): Promise<void> {
  const h = s.header;
  const sub = h.subclusterSize;
  if (t.plans.every((p) => p.mode === DIRECT)) return;
  // The table is COPIED and allocated since planning, so its L1 entry is stable; a clean
  // table may have been evicted meanwhile, and then its disk copy is current.
  const off = readL1Entry(s, t.l1i).off;
  const table = s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
  for (const p of t.plans) {
    if (p.mode === DIRECT) continue;
    const e = p.e;
    if (h.extendedL2) {
      const bits = subclusterBits(Math.floor(p.a / sub), Math.floor((p.b - 1) / sub));
      let alloc: number;
      let zero: number;
      if (p.mode === FILL) {
        alloc = (e.allocMask | bits) >>> 0;
        zero = (e.zeroMask & ~bits) >>> 0;
      } else if (e.compressed || e.host !== 0) {
        alloc = ALL_SUBCLUSTERS;
        zero = 0;
      } else {
        alloc = bits;
        zero = (e.zeroMask & ~bits) >>> 0;
      }
      writeL2Entry(s, table, p.idx, p.target, true, false, alloc, zero);
    } else {
      writeL2Entry(s, table, p.idx, p.target, true, false);
    }
    if (p.mode === MOVE) freeEntryClusters(s, e);
    markL2Dirty(s, off, p.idx);
  }
}
