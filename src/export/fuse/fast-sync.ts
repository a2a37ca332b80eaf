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

  /** After a read served in JavaScript, tells the fast path where the surrounding granules live. */
  learn(gen: number, position: number, n: number): void {
    const map = this.node.mapHostCached;
    if (!map || gen < 0 || !this.fast) return;
    const size = this.node.length();
    const start = Math.floor(position / GRANULE) * GRANULE;
    const end = Math.min(Math.ceil((position + n) / GRANULE) * GRANULE, size);
    const extents = end > start ? map.call(this.node, start, end - start) : null;
    if (extents) this.fast.install(gen, start, extents);
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
   * the invalidation's generation.
   */
  async writing(offset: number, length: number, fn: () => Promise<void>): Promise<void> {
    const fast = this.fast;
    const map = this.node.mapHostCached;
    if (!fast || !map || !this.on) return this.changing(offset, length, fn);
    const before = map.call(this.node, offset, length);
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
