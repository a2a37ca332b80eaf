/**
 * Crash states from a recorded write log (pure functions; log-writes.ts
 * records the log). The model is the one dm-log-writes and CrashMonkey use:
 * the kernel may write back any pwritten page at any moment, and only a
 * completed fdatasync makes durable the writes that had completed before it
 * started. After a power loss the image file therefore holds
 *   - its content at the start of the run,
 *   - every write (and truncate) durable at the crash point,
 *   - any subset of the writes issued since, each whole or absent, or torn
 *     at 512-byte sector boundaries (every sector of it there or not),
 * applied in the order they were issued.
 *
 * Crash points are grouped into epochs: epoch k is every point after the
 * k-th sync completed and up to the moment the next one completes. The
 * durable set is the same for every point of an epoch and the issued set is
 * largest at its end, so choosing subsets of "issued by the end of the
 * epoch" covers every crash point of the epoch.
 *
 * The guest side: a guest write, write-zeroes, discard or resize is covered
 * when a guest flush that started after it ended completed before the crash
 * point; its bytes must read back exactly, unless a later guest operation
 * issued before the crash point touched them. Discarded bytes are never
 * expected (they may read as zeroes or as before). A state is consistent
 * with every crash point from its earliest (the epoch start, or just after
 * the last issued write it contains) to the epoch end; expectations are
 * computed at both ends.
 */

export const SECTOR = 512;

export type GuestOp =
  | { op: 'write'; offset: number; data: Buffer }
  | { op: 'zeroes'; offset: number; length: number }
  | { op: 'discard'; offset: number; length: number }
  | { op: 'resize'; size: number }
  | { op: 'flush' };

export type LogEvent =
  | { kind: 'write'; id: number; offset: number; data: Buffer }
  | { kind: 'truncate'; id: number; size: number }
  | { kind: 'sync'; id: number }
  | { kind: 'guest'; id: number; op: GuestOp }
  | { kind: 'end'; id: number };

/** A host request (write or truncate) with the event indices of its start and end. */
export interface HostOp {
  index: number;
  start: number;
  /** Event index of its end; events.length when it never ended. */
  end: number;
  offset: number;
  /** The bytes written (writes) or undefined (truncates). */
  data: Buffer | undefined;
  /** The new size (truncates). */
  size: number;
}

export interface TimedGuestOp {
  op: GuestOp;
  start: number;
  end: number;
}

export interface Epoch {
  /** Crash points of this epoch are in (from, to]: after event `from`'s sync end, up to the next one. */
  from: number;
  to: number;
  /** Host ops durable at every point of the epoch (indices into ops). */
  durable: number[];
  /** Host ops issued by the end of the epoch and not durable: any subset may be on disk. */
  volatile: number[];
}

export interface LogAnalysis {
  ops: HostOp[];
  guest: TimedGuestOp[];
  epochs: Epoch[];
  /** Number of completed syncs. */
  syncs: number;
  events: number;
}

/** Splits a log into host ops, guest ops and epochs. */
export function analyzeLog(events: readonly LogEvent[]): LogAnalysis {
  const endOf = new Map<number, number>();
  events.forEach((e, i) => {
    if (e.kind === 'end') endOf.set(e.id, i);
  });
  const ops: HostOp[] = [];
  const guest: TimedGuestOp[] = [];
  const syncs: { start: number; end: number }[] = [];
  events.forEach((e, i) => {
    const end = endOf.get((e as { id: number }).id) ?? events.length;
    if (e.kind === 'write') {
      ops.push({ index: ops.length, start: i, end, offset: e.offset, data: e.data, size: 0 });
    } else if (e.kind === 'truncate') {
      ops.push({ index: ops.length, start: i, end, offset: 0, data: undefined, size: e.size });
    } else if (e.kind === 'sync' && end < events.length) {
      syncs.push({ start: i, end });
    } else if (e.kind === 'guest') {
      guest.push({ op: e.op, start: i, end });
    }
  });
  syncs.sort((a, b) => a.end - b.end);
  const epochs: Epoch[] = [];
  let barrier = -1; // ops that ended before this event index are durable
  const bounds = [-1, ...syncs.map((s) => s.end), events.length];
  for (let k = 0; k + 1 < bounds.length; k++) {
    if (k > 0) barrier = Math.max(barrier, syncs[k - 1]!.start);
    const from = bounds[k]!;
    const to = bounds[k + 1]!;
    const durable: number[] = [];
    const volatile: number[] = [];
    for (const o of ops) {
      if (o.end < barrier) durable.push(o.index);
      else if (o.start < to) volatile.push(o.index);
    }
    epochs.push({ from, to, durable, volatile });
  }
  return { ops, guest, epochs, syncs: syncs.length, events: events.length };
}

/** Sector pieces [from, to) (relative to the write) of a write at `offset` of `len` bytes. */
export function sectorPieces(offset: number, len: number): [number, number][] {
  const out: [number, number][] = [];
  let at = offset;
  while (at < offset + len) {
    const next = Math.min(offset + len, (Math.floor(at / SECTOR) + 1) * SECTOR);
    out.push([at - offset, next - offset]);
    at = next;
  }
  return out;
}

/** One crash state: an epoch, and which of its volatile ops reached the disk (a mask of sectors: torn). */
export interface CrashState {
  epoch: number;
  /** Volatile op index → true (whole) or the sector pieces that made it (torn). */
  chosen: Map<number, true | boolean[]>;
  /** How it was picked (for messages). */
  how: string;
}

/** Applies host ops (in this order) onto `img`, which holds `len` bytes of image; returns the new length. */
function applyOps(
  img: Buffer,
  len: number,
  a: LogAnalysis,
  apply: number[],
  chosen: CrashState['chosen'],
): number {
  for (const i of apply) {
    const o = a.ops[i]!;
    const how = chosen.get(i) ?? true;
    if (!o.data) {
      if (o.size < len) img.fill(0, o.size, len);
      len = o.size;
    } else if (how === true) {
      o.data.copy(img, o.offset);
      len = Math.max(len, o.offset + o.data.length);
    } else {
      sectorPieces(o.offset, o.data.length).forEach(([f, t], p) => {
        if (!how[p]) return;
        o.data!.copy(img, o.offset + f, f, t);
        len = Math.max(len, o.offset + t);
      });
    }
  }
  return len;
}

/** The host ops of a state in issue order (op indices follow issue order). */
function opsOf(a: LogAnalysis, st: CrashState): number[] {
  return [...a.epochs[st.epoch]!.durable, ...st.chosen.keys()].sort((x, y) => x - y);
}

/** The largest the image file gets in any state. */
function capacity(base: Buffer, a: LogAnalysis): number {
  let cap = base.length;
  for (const o of a.ops) cap = Math.max(cap, o.data ? o.offset + o.data.length : o.size);
  return cap;
}

/** The image file bytes in a crash state: durable and chosen ops applied in issue order. */
export function buildImage(base: Buffer, a: LogAnalysis, st: CrashState): Buffer {
  const img = Buffer.alloc(capacity(base, a));
  base.copy(img);
  return img.subarray(0, applyOps(img, base.length, a, opsOf(a, st), st.chosen));
}

/**
 * buildImage into one reused buffer (a new multi-MiB buffer per state costs
 * more in garbage collection than the build itself): the result is valid
 * until the next build.
 */
export class ImageBuilder {
  private readonly img: Buffer;

  constructor(
    private readonly base: Buffer,
    private readonly a: LogAnalysis,
  ) {
    this.img = Buffer.alloc(capacity(base, a));
  }

  build(st: CrashState): Buffer {
    this.base.copy(this.img);
    this.img.fill(0, this.base.length);
    return this.img.subarray(0, applyOps(this.img, this.base.length, this.a, opsOf(this.a, st), st.chosen));
  }
}

/** The earliest crash point (exclusive event bound) consistent with a state. */
export function earliestPoint(a: LogAnalysis, st: CrashState): number {
  let p = a.epochs[st.epoch]!.from + 1;
  for (const i of st.chosen.keys()) p = Math.max(p, a.ops[i]!.start + 1);
  return p;
}

/** The latest crash point (exclusive event bound) of a state's epoch. */
export function latestPoint(a: LogAnalysis, st: CrashState): number {
  return a.epochs[st.epoch]!.to;
}

/** What the guest disk must show at a crash point: `content` outside `unknown`, and the size when certain. */
export interface GuestExpectation {
  content: Buffer;
  size: number;
  sizeCertain: boolean;
  /** Sorted, merged byte ranges [start, end) whose content is not certain. */
  unknown: [number, number][];
  /** Guest flushes completed before the point. */
  flushes: number;
}

function addRange(list: [number, number][], start: number, end: number): void {
  if (end > start) list.push([start, end]);
}

function merge(list: [number, number][]): [number, number][] {
  list.sort((x, y) => x[0] - y[0]);
  const out: [number, number][] = [];
  for (const r of list) {
    const last = out[out.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else out.push([r[0], r[1]]);
  }
  return out;
}

function opRange(op: GuestOp, size: number): [number, number] {
  if (op.op === 'write') return [op.offset, op.offset + op.data.length];
  if (op.op === 'zeroes' || op.op === 'discard') return [op.offset, op.offset + op.length];
  if (op.op === 'resize') return [Math.min(size, op.size), Math.max(size, op.size)];
  return [0, 0];
}

/** The guest disk as the last completed flush left it: content, size, and discarded (uncertain) ranges. */
interface Covered {
  content: Buffer;
  size: number;
  unknown: [number, number][];
}

/** Removes [s, e) from a list of ranges. */
function cut(list: [number, number][], s: number, e: number): [number, number][] {
  const kept: [number, number][] = [];
  for (const [us, ue] of list) {
    if (ue <= s || us >= e) kept.push([us, ue]);
    else {
      addRange(kept, us, s);
      addRange(kept, e, ue);
    }
  }
  return kept;
}

/**
 * Guest expectations of one log. The workload must be sequential (each
 * guest op ends before the next starts). The state after each completed
 * flush is built once and kept while crash points move forward.
 */
export class GuestModel {
  private readonly cache = new Map<number, Covered>();

  constructor(
    private readonly a: LogAnalysis,
    private readonly initial: Buffer,
  ) {}

  /** Applies guest ops [0, upto) to the initial content. */
  private covered(upto: number): Covered {
    const hit = this.cache.get(upto);
    if (hit) return hit;
    let content: Buffer = Buffer.from(this.initial);
    let size = this.initial.length;
    let unknown: [number, number][] = [];
    for (let i = 0; i < upto; i++) {
      const op = this.a.guest[i]!.op;
      if (op.op === 'write') op.data.copy(content, op.offset);
      else if (op.op === 'zeroes') content.fill(0, op.offset, op.offset + op.length);
      else if (op.op === 'discard') addRange(unknown, op.offset, op.offset + op.length);
      else if (op.op === 'resize') {
        // Bytes cut off and grown back read as zeroes (a grown qcow2 reads zero there).
        const next = Buffer.alloc(op.size);
        content.copy(next, 0, 0, Math.min(size, op.size));
        content = next;
        size = op.size;
        unknown = cut(unknown, size, Number.MAX_SAFE_INTEGER);
      }
      // A later write over discarded bytes makes them certain again.
      if (op.op === 'write' || op.op === 'zeroes') unknown = cut(unknown, ...opRange(op, size));
    }
    const c = { content, size, unknown };
    if (this.cache.size >= 2) this.cache.delete(this.cache.keys().next().value!);
    this.cache.set(upto, c);
    return c;
  }

  /** The expectation at crash point `p` (events before index p happened). */
  at(p: number): GuestExpectation {
    const guest = this.a.guest;
    let lastFlush = -1;
    let flushes = 0;
    guest.forEach((g, i) => {
      if (g.op.op === 'flush' && g.end < p) {
        lastFlush = i;
        flushes++;
      }
    });
    const c = this.covered(Math.max(0, lastFlush));
    const unknown = [...c.unknown];
    let sizeCertain = true;
    // Issued after that flush (and before the point): uncertain.
    for (let i = lastFlush + 1; i < guest.length; i++) {
      const g = guest[i]!;
      if (g.start >= p) break;
      addRange(unknown, ...opRange(g.op, c.size));
      if (g.op.op === 'resize') sizeCertain = false;
    }
    return { content: c.content, size: c.size, sizeCertain, unknown: merge(unknown), flushes };
  }
}

/** The guest expectation at crash point `p`, from the guest disk's content at the start. */
export function expectedAt(a: LogAnalysis, initial: Buffer, p: number): GuestExpectation {
  return new GuestModel(a, initial).at(p);
}

/**
 * Compares what the guest reads in a crash state with an expectation; returns
 * a message for the first difference, or undefined.
 */
export function compareGuest(got: Buffer, exp: GuestExpectation): string | undefined {
  if (exp.sizeCertain && got.length !== exp.size) {
    return `virtual size ${got.length}, expected ${exp.size} (a flushed resize was lost)`;
  }
  const limit = Math.min(got.length, exp.size);
  let at = 0;
  const check = (s: number, e: number): string | undefined => {
    const end = Math.min(e, limit);
    if (end <= s) return undefined;
    if (got.compare(exp.content, s, end, s, end) === 0) return undefined;
    let i = s;
    while (i < end && got[i] === exp.content[i]) i++;
    return `guest byte ${i} reads ${got[i]}, expected ${exp.content[i]} (flushed data lost)`;
  };
  for (const [us, ue] of exp.unknown) {
    const m = check(at, us);
    if (m) return m;
    at = Math.max(at, ue);
  }
  return check(at, limit);
}

/** Sampling options: states per epoch beyond the fixed ones, torn share. */
export interface SampleOptions {
  /** Random subsets per epoch (besides none, all and all-but-one). */
  random: number;
  /** Share of random subsets with torn writes. */
  torn: number;
  /** Total cap (states beyond are dropped evenly); undefined = no cap. */
  max?: number;
}

function key(st: CrashState, durableCount: number): string {
  const parts = [...st.chosen.entries()]
    .sort((x, y) => x[0] - y[0])
    .map(([i, m]) => (m === true ? `${i}` : `${i}:${m.map((b) => (b ? 1 : 0)).join('')}`));
  return `${durableCount}|${parts.join(',')}`;
}

/**
 * Crash states of a log, systematically: for every epoch none, all, all
 * but one (a random one) and a prefix in issue order, then `random` seeded
 * random subsets (a share of them with torn multi-sector writes). States
 * that produce the same image from the same durable set are kept once.
 */
export function sampleStates(a: LogAnalysis, rand: () => number, o: SampleOptions): CrashState[] {
  const out = new Map<string, CrashState>();
  const add = (epoch: number, chosen: Map<number, true | boolean[]>, how: string) => {
    const st = { epoch, chosen, how };
    const k = key(st, a.epochs[epoch]!.durable.length);
    if (!out.has(k)) out.set(k, st);
  };
  a.epochs.forEach((e, k) => {
    const v = e.volatile;
    add(k, new Map(), 'none');
    add(k, new Map(v.map((i) => [i, true])), 'all');
    if (v.length > 1) {
      const skip = v[Math.floor(rand() * v.length)]!;
      add(k, new Map(v.filter((i) => i !== skip).map((i) => [i, true])), `all but op ${skip}`);
      const cut = 1 + Math.floor(rand() * (v.length - 1));
      add(k, new Map(v.slice(0, cut).map((i) => [i, true])), `first ${cut} in issue order`);
    }
    for (let r = 0; r < o.random && v.length > 0; r++) {
      const p = 0.2 + 0.6 * rand();
      const torn = rand() < o.torn;
      const chosen = new Map<number, true | boolean[]>();
      for (const i of v) {
        if (rand() >= p) continue;
        const op = a.ops[i]!;
        if (torn && op.data && op.data.length > SECTOR && rand() < 0.5) {
          chosen.set(
            i,
            sectorPieces(op.offset, op.data.length).map(() => rand() < 0.5),
          );
        } else chosen.set(i, true);
      }
      add(k, chosen, torn ? 'random subset, torn' : 'random subset');
    }
  });
  const all = [...out.values()];
  if (o.max === undefined || all.length <= o.max) return all;
  const step = all.length / o.max;
  return Array.from({ length: o.max }, (_, i) => all[Math.floor(i * step)]!);
}

/** Pairs of host writes that ran at the same time over the same bytes (their order on disk is not defined). */
export function overlappingConcurrentWrites(a: LogAnalysis): [HostOp, HostOp][] {
  const out: [HostOp, HostOp][] = [];
  const writes = a.ops.filter((o) => o.data);
  for (let i = 0; i < writes.length; i++) {
    const x = writes[i]!;
    for (let j = i + 1; j < writes.length; j++) {
      const y = writes[j]!;
      if (y.start > x.end) break;
      const overlap = x.offset < y.offset + y.data!.length && y.offset < x.offset + x.data!.length;
      if (overlap) out.push([x, y]);
    }
  }
  return out;
}

/** A short description of a state for failure messages. */
export function describeState(a: LogAnalysis, st: CrashState): string {
  const e = a.epochs[st.epoch]!;
  const parts = [...st.chosen.entries()].map(([i, m]) => {
    const o = a.ops[i]!;
    const what = o.data ? `write ${o.offset}+${o.data.length}` : `truncate ${o.size}`;
    return m === true ? what : `${what} torn ${m.map((b) => (b ? 1 : 0)).join('')}`;
  });
  return (
    `epoch ${st.epoch} (after event ${e.from}, ${e.durable.length} durable ops, ${e.volatile.length} volatile), ` +
    `${st.how}: [${parts.join('; ')}]`
  );
}
