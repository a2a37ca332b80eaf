/**
 * The allocation pool: clusters counted ahead in batches, so that a write
 * that allocates usually finds its clusters' refcounts already durable and
 * needs no refcount write and no sync of its own before it may resolve.
 *
 * A batch is counted (refcount 1 in memory) while the previous one is still
 * being handed out; the next write-back writes its refcount pages and syncs
 * them in the background (metadata-cache.ts). Each batch remembers the block
 * snapshot that carries its refcounts (`needs`): once that snapshot is
 * synced (`durable`), an L2 entry may name its clusters without a sync. A
 * cluster handed out from a batch not yet durable raises `needed`, and the
 * next commit syncs before writing entries — correct, only slower; the batch
 * size then doubles so the pool stays ahead.
 *
 * A process that dies leaks what the pool holds (at most two batches:
 * `qemu-img check` reports leaks, never corruption); a clean close or a
 * reopen read-only gives it back (Refcounts.releasePool).
 */
import type { Qcow2Header } from './header.js';

/**
 * One batch counts this much space ahead at first; it doubles whenever
 * allocation outruns the sync that makes the next batch durable, up to
 * POOL_MAX_BYTES or a sixteenth of the virtual size. Between 4 and
 * POOL_MAX_CLUSTERS clusters.
 */
const POOL_BYTES = 4 * 1024 * 1024;
const POOL_MAX_BYTES = 64 * 1024 * 1024;
const POOL_MAX_CLUSTERS = 8192;

/** A run of free clusters handed out by the allocator. */
export interface ClusterRun {
  /** First cluster index. */
  start: number;
  count: number;
  /** The clusters were never used before: they read as zeroes on disk (the file was only extended). */
  fresh: boolean;
}

/** A counted run not yet handed out; durable once block snapshot `needs` is synced. */
export interface PoolRun extends ClusterRun {
  needs: number;
}

export class AllocationPool {
  private runs: PoolRun[] = [];
  /** Block snapshots the write-back has taken; refcount changes made now go into the next one. */
  private snapshots = 0;
  /** The last block snapshot synced: every refcount change made before it is durable. */
  private durableAt = 0;
  /** The block snapshot that must be durable before an entry may name every cluster handed out so far. */
  private neededAt = 0;
  /** How much one batch counts ahead (bytes; see batch()). */
  private bytes = POOL_BYTES;
  /**
   * Refcounts must be durable before an entry names their cluster. False
   * with lazy refcounts (the dirty bit stands in for the order): then the
   * pool only batches allocation and never makes a commit wait.
   */
  ordered = true;

  constructor(
    private readonly h: Qcow2Header,
    /** Counts up to n contiguous free clusters now (refcount 1 in memory). */
    private readonly count: (n: number) => Promise<ClusterRun>,
  ) {}

  /** Up to n contiguous clusters from the pool (refilling it as needed). */
  async take(n: number): Promise<ClusterRun> {
    let at = this.runs.findIndex((r) => r.needs <= this.durableAt);
    if (at < 0) {
      if (this.runs.length === 0) await this.refill(Math.max(n, this.batch()));
      at = 0;
    }
    const from = this.runs[at]!;
    const count = Math.min(n, from.count);
    const run = { start: from.start, count, fresh: from.fresh };
    from.start += count;
    from.count -= count;
    if (from.count === 0) this.runs.splice(at, 1);
    if (!this.ordered) return run;
    if (from.needs > this.durableAt && from.needs > this.neededAt) {
      // A commit will wait for this batch to be synced: count further ahead from now on.
      this.neededAt = from.needs;
      this.bytes = Math.min(POOL_MAX_BYTES, this.bytes * 2);
    }
    // While one batch is handed out the next is counted, so it is durable before it is needed.
    let ready = 0;
    let waiting = false;
    for (const r of this.runs) {
      if (r.needs <= this.durableAt) ready += r.count;
      else waiting = true;
    }
    if (!waiting && ready < this.batch()) await this.refill(this.batch());
    return run;
  }

  /** Exactly these clusters, counted now, outside the pool (the L1 table of a resize): the next commit syncs first. */
  async exact(n: number): Promise<ClusterRun> {
    const run = await this.count(n);
    this.neededAt = this.snapshots + 1;
    return run;
  }

  /** Clusters in one batch: `bytes`, at most a sixteenth of the virtual size. */
  private batch(): number {
    const cs = this.h.clusterSize;
    const bytes = Math.min(this.bytes, Math.floor(this.h.size / 16));
    return Math.max(4, Math.min(POOL_MAX_CLUSTERS, Math.floor(bytes / cs)));
  }

  /** Counts a batch into the pool; it is durable once the next block snapshot is synced. */
  private async refill(n: number): Promise<void> {
    const run = await this.count(n);
    this.runs.push({ ...run, needs: this.snapshots + 1 });
  }

  /** The write-back takes a block snapshot (every dirty refcount page): returns its number. */
  takeSnapshot(): number {
    return ++this.snapshots;
  }

  /** Block snapshot `n` (and every one before it) is written and synced. */
  synced(n: number): void {
    if (n > this.durableAt) this.durableAt = n;
  }

  /** Whether block snapshot `n` is durable. */
  isDurable(n: number): boolean {
    return n <= this.durableAt;
  }

  /** Whether a cluster handed out is not durably counted yet: entries naming it must wait for a sync. */
  get behind(): boolean {
    return this.ordered && this.neededAt > this.durableAt;
  }

  /** Empties the pool and returns its runs (to give their clusters back). */
  drain(): PoolRun[] {
    const runs = this.runs;
    this.runs = [];
    return runs;
  }
}
