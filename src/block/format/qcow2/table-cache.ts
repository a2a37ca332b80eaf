/**
 * An LRU cache of metadata tables (L2 tables, refcount blocks) bounded in
 * bytes. A table that many reads miss on at the same moment is loaded once:
 * later callers share the pending promise.
 */

export interface TableCacheStats {
  hits: number;
  misses: number;
  loads: number;
  evictions: number;
}

export class TableCache {
  /** Map iteration order is insertion order: the first key is the least recently used. */
  private readonly tables = new Map<number, Buffer>();
  private readonly pending = new Map<number, Promise<Buffer>>();
  /** Tables that must stay cached (dirty or being written back): never evicted. */
  private readonly pinned = new Set<number>();
  private bytes = 0;
  readonly stats: TableCacheStats = { hits: 0, misses: 0, loads: 0, evictions: 0 };

  constructor(
    /** Upper bound of cached bytes (at least one table is always kept). */
    readonly maxBytes: number,
    private readonly load: (offset: number) => Promise<Buffer>,
  ) {}

  /** The cached table at `offset`, marked most recently used; undefined on a miss. */
  peek(offset: number): Buffer | undefined {
    const t = this.tables.get(offset);
    if (t !== undefined) {
      this.stats.hits++;
      this.tables.delete(offset);
      this.tables.set(offset, t);
    }
    return t;
  }

  /** The table at `offset`, loading it (once, however many callers wait) on a miss. */
  get(offset: number, load: (offset: number) => Promise<Buffer> = this.load): Buffer | Promise<Buffer> {
    const t = this.peek(offset);
    if (t !== undefined) return t;
    this.stats.misses++;
    let p = this.pending.get(offset);
    if (p === undefined) {
      this.stats.loads++;
      p = load(offset).then(
        (buf) => {
          this.pending.delete(offset);
          this.insert(offset, buf);
          return buf;
        },
        (e: unknown) => {
          this.pending.delete(offset);
          throw e;
        },
      );
      this.pending.set(offset, p);
    }
    return p;
  }

  private insert(offset: number, buf: Buffer): void {
    const old = this.tables.get(offset);
    if (old !== undefined) {
      this.bytes -= old.length;
      this.tables.delete(offset);
    }
    if (this.bytes + buf.length > this.maxBytes) {
      for (const [k, v] of this.tables) {
        if (this.bytes + buf.length <= this.maxBytes) break;
        if (this.pinned.has(k)) continue;
        this.tables.delete(k);
        this.bytes -= v.length;
        this.stats.evictions++;
      }
    }
    this.tables.set(offset, buf);
    this.bytes += buf.length;
  }

  /** Puts a table made in memory (a new or copied table) into the cache, pinned. */
  put(offset: number, buf: Buffer): void {
    this.pinned.add(offset);
    this.insert(offset, buf);
  }

  /** Keeps the cached table at `offset` from eviction (it is dirty or being written back). */
  pin(offset: number): void {
    this.pinned.add(offset);
  }

  /** Lets the table at `offset` be evicted again. */
  unpin(offset: number): void {
    this.pinned.delete(offset);
  }

  /** Drops the table at `offset` (a freed table) from the cache. */
  drop(offset: number): void {
    const t = this.tables.get(offset);
    if (t !== undefined) {
      this.tables.delete(offset);
      this.bytes -= t.length;
    }
    this.pinned.delete(offset);
  }

  /** Bytes currently cached. */
  get size(): number {
    return this.bytes;
  }

  /** Drops every cached table. */
  clear(): void {
    this.tables.clear();
    this.pinned.clear();
    this.bytes = 0;
  }
}
