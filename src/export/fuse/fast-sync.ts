/**
 * Keeps the binding's read fast path exact for one export: after a read
 * served in JavaScript it installs the host mapping of the granules around
 * it (from caches only), and around every change it invalidates what may
 * have moved. The map changes only through here.
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

  constructor(
    private readonly node: BlockNode,
    private readonly fast: FastPath | undefined,
  ) {}

  /** Turns the fast path on or off (off while another export shares a node and either writes). */
  enable(on: boolean): void {
    this.on = on;
    this.fast?.enable(on);
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
    const map = this.node.mapHostCached;
    if (!map || gen < 0 || !this.fast) return;
    const size = this.node.length();
    const start = Math.floor(position / GRANULE) * GRANULE;
    const end = Math.min(Math.ceil((position + n) / GRANULE) * GRANULE, size);
    if (end <= start) return;
    const own = map.call(this.node, start, end - start);
    if (own) this.fast.install(gen, start, own);
    // Compressed clusters smaller than a granule are never installed: mapping their neighbours is wasted.
    if (own?.some((x) => 'compressed' in x && x.compressed.clusterSize < GRANULE)) return;
    const from = Math.max(0, Math.floor((start - LEARN_AROUND) / LEARN_CHUNK) * LEARN_CHUNK);
    const to = Math.min(size, end + LEARN_AROUND);
    for (let at = from; at < to; at += LEARN_CHUNK) {
      const len = Math.min(LEARN_CHUNK, size - at);
      const extents = map.call(this.node, at, len);
      if (extents) this.fast.install(gen, at, extents);
    }
  }

  /** Forgets everything and bounds reads by the node's size (at mount). */
  reset(): void {
    this.fast?.invalidate(0, 0, this.node.length());
  }

  /** Runs a change of [offset, offset+length) with the fast path told before and after. */
  async changing<T>(offset: number, length: number, fn: () => Promise<T>): Promise<T> {
    const fast = this.fast;
    if (!fast) return fn();
    fast.invalidate(offset, length);
    try {
      return await fn();
    } finally {
      fast.invalidate(offset, length, this.node.length());
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
      if (!before || !after || !sameExtents(before, after))
        fast.invalidate(offset, length, this.node.length());
    }
  }

  /** Reads and bytes the binding served without JavaScript. */
  stats(): { reads: number; bytes: number } | undefined {
    return this.fast?.stats();
  }
}
