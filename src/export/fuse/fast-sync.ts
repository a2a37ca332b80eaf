/**
 * Keeps the binding's fast path exact for one export: after a read or write
 * served in JavaScript it installs the host mapping of the granules around
 * it (from caches only; pieces the node says are writable in place are
 * marked so, and the binding's workers then write them with pwrite), and
 * around every change it invalidates what may have moved. The map changes
 * only through here.
 *
 * The rules that keep native writes exact (docs/fuse-export.md, "The write
 * fast path"): a change that may move a range (write-zeroes, discard,
 * truncate) invalidates it first, and the binding's invalidation returns only
 * once no native write can still use the old mapping; while such a change
 * runs nothing is installed over its range, so no native write can start
 * there before the change is complete and invalidated again. A write served
 * here never moves a range that was installed writable (only unallocated,
 * zero, compressed or shared clusters move, and those are never writable).
 * Compressed clusters are installed too (the workers inflate them), never
 * writable.
 */
import type { BlockNode, HostExtent } from '../../block/types.js';
import type { FastPath } from './file-fs.js';

/** The fast path's granule (GRANULE_BITS in native-fuse/fast_map.h). */
const GRANULE = 64 * 1024;
/**
 * How far around a read served in JavaScript the mapping is also installed,
 * in chunks of LEARN_CHUNK, each when the caches know it: a sequential reader
 * then finds the next requests mapped (a one-pass read of a compressed image
 * would otherwise never reach the workers), and a random reader soon finds
 * most of the disk mapped.
 */
const LEARN_AROUND = 32 * 1024 * 1024;
const LEARN_CHUNK = 8 * 1024 * 1024;
/** What one install maps around a write served in JavaScript (from caches only). */
const WINDOW = 1024 * 1024;
/** A length that covers any export. */
const ALL = Number.MAX_SAFE_INTEGER;

/** True when two host mappings are the same pieces. */
function sameExtents(a: readonly HostExtent[], b: readonly HostExtent[]): boolean {
  if (a.length !== b.length) return false;
  return a.every((x, i) => {
    const y = b[i]!;
    if (x.length !== y.length) return false;
    if ('zero' in x || 'zero' in y) return 'zero' in x && 'zero' in y;
    if ('compressed' in x || 'compressed' in y) {
      if (!('compressed' in x && 'compressed' in y)) return false;
      const [c, d] = [x.compressed, y.compressed];
      return (
        c.fd === d.fd &&
        c.host === d.host &&
        c.clen === d.clen &&
        c.clusterSize === d.clusterSize &&
        c.skip === d.skip &&
        c.algorithm === d.algorithm
      );
    }
    return x.fd === y.fd && x.host === y.host;
  });
}

export class FastPathSync {
  /** In use (reads teach it; writes keep it exact); size changes reach the binding regardless. */
  private on = true;
  /** The binding may write writable granules (the export is writable). */
  private writes = false;
  /** Ranges [start, end) a change is moving right now: nothing is installed over them. */
  private readonly moving = new Set<[number, number]>();

  constructor(
    private readonly node: BlockNode,
    private readonly fast: FastPath | undefined,
  ) {}

  /** Turns the fast path on or off (off while another export shares a node and either writes). */
  enable(on: boolean): void {
    this.on = on;
    this.fast?.enable(on);
  }

  /**
   * Lets the binding write granules installed writable (the export is
   * writable), or stops it; either way the map is forgotten, so what is
   * installed next carries the node's writability as it is now. Off returns
   * once no native write is in flight.
   */
  allowWrites(on: boolean): void {
    if (!this.fast) return;
    this.writes = on;
    this.fast.allowWrites(on);
    this.fast.invalidate(0, ALL);
  }

  /** The generation to pass to learn() after a read, or -1 when nothing is to be learnt. */
  gen(): number {
    return this.on ? (this.fast?.gen() ?? -1) : -1;
  }

  /**
   * After a read served in JavaScript, tells the fast path where its granules
   * live, and those of the chunks around it that the caches know.
   */
  learn(gen: number, position: number, n: number): void {
    if (!this.node.mapHostCached || gen < 0 || !this.fast) return;
    const size = this.node.length();
    const start = Math.floor(position / GRANULE) * GRANULE;
    const end = Math.min(Math.ceil((position + n) / GRANULE) * GRANULE, size);
    const own = this.install(gen, start, end);
    // Compressed clusters smaller than a granule are never installed: mapping their neighbours is wasted.
    if (own?.some((x) => 'compressed' in x && x.compressed.clusterSize < GRANULE)) return;
    const from = Math.max(0, Math.floor((start - LEARN_AROUND) / LEARN_CHUNK) * LEARN_CHUNK);
    const to = Math.min(size, end + LEARN_AROUND);
    for (let at = from; at < to; at += LEARN_CHUNK) this.install(gen, at, Math.min(at + LEARN_CHUNK, size));
  }

  /**
   * After a write served in JavaScript: the window around it when its tables
   * are cached (a random workload then needs one trip to JavaScript per
   * window, not per granule), else just the write's granules.
   */
  private learnWritten(gen: number, position: number, n: number): void {
    if (!this.node.mapHostCached || gen < 0 || !this.fast) return;
    const size = this.node.length();
    const around = (unit: number) =>
      this.install(
        gen,
        Math.floor(position / unit) * unit,
        Math.min(Math.ceil((position + n) / unit) * unit, size),
      );
    if (around(WINDOW) === null) around(GRANULE);
  }

  /** Installs [start, end) from the caches; the extents installed, or null when caches could not map it. */
  private install(gen: number, start: number, end: number): HostExtent[] | null {
    if (end <= start || this.isMoving(start, end)) return [];
    const extents = this.node.mapHostCached!(start, end - start);
    if (extents) this.fast!.install(gen, start, extents);
    return extents;
  }

  private isMoving(start: number, end: number): boolean {
    for (const [a, b] of this.moving) if (start < b && a < end) return true;
    return false;
  }

  /** Forgets everything and bounds reads by the node's size (at mount). */
  reset(): void {
    this.fast?.invalidate(0, 0, this.node.length());
  }

  /** Runs a change of [offset, offset+length) with the fast path told before and after. */
  async changing<T>(offset: number, length: number, fn: () => Promise<T>): Promise<T> {
    const fast = this.fast;
    if (!fast) return fn();
    const range: [number, number] = [offset, offset + length];
    this.moving.add(range);
    try {
      fast.invalidate(offset, length);
      return await fn();
    } finally {
      this.moving.delete(range);
      // Nothing was installed over the range since the first invalidation: no native write to wait for.
      fast.invalidate(offset, length, this.node.length(), false);
    }
  }

  /**
   * Runs a write. An overwrite in place (a raw file, an allocated qcow2
   * cluster) leaves the host mapping as it was, and the fast path keeps it;
   * only a write that moved or allocated something invalidates its range.
   * Reads overlapping the write may see old or new bytes, as with any
   * concurrent read; installs computed before a moving write are dropped by
   * the invalidation's generation. A write over a compressed cluster also
   * invalidates before it starts (its host bytes are freed and may be reused).
   */
  async writing(offset: number, length: number, fn: () => Promise<void>): Promise<void> {
    const fast = this.fast;
    const map = this.node.mapHostCached;
    if (!fast || !map || !this.on) return this.changing(offset, length, fn);
    const before = map.call(this.node, offset, length);
    // A write into a compressed cluster moves it and frees its host bytes, which the same
    // write may reuse: forget the range before, not only after.
    if (before?.some((x) => 'compressed' in x)) return this.changing(offset, length, fn);
    try {
      await fn();
    } finally {
      const after = map.call(this.node, offset, length);
      // Only unallocated, zero, compressed or shared clusters move, and those are never writable:
      // no native write can be using what changed, so nothing to wait for.
      if (!before || !after || !sameExtents(before, after))
        fast.invalidate(offset, length, this.node.length(), false);
    }
    // The write's own entries are in the file now: teach the map, so the next write here is native.
    if (this.writes) this.learnWritten(fast.gen(), offset, length);
  }

  /** Reads, writes and bytes the binding served without JavaScript. */
  stats(): { reads: number; bytes: number; writes: number; writeBytes: number } | undefined {
    return this.fast?.stats();
  }
}
