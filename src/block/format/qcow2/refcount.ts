/**
 * Refcounts: the refcount table (read at open, ≤ 8 MiB and inside the file)
 * points at refcount blocks. Entries are refcount_bits wide (1..64), packed
 * from the least significant bit. Blocks are loaded on first use and kept
 * (a 2 GiB stretch of the image per 64 KiB block at 16 bits), so allocation
 * can scan them; writers change them in memory and mark them dirty, and the
 * metadata write-back (metadata-cache.ts) writes them before anything that
 * depends on them. Allocation hands out clusters counted ahead in batches
 * (pool.ts), so their refcounts are usually durable before a write needs
 * them. Freeing is deferred: a decrement is queued and applied only after
 * the references to the cluster are gone on disk.
 */
import { BlkError, Errno } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import { MAX_REFCOUNT_TABLE_BYTES, type Qcow2Header } from './header.js';
import { AllocationPool, type ClusterRun } from './pool.js';
import { TABLE_PAGE } from './state.js';

const TWO32 = 2 ** 32;
/** What the allocator needs from its owner: growing the file and learning about new metadata. */
export interface RefcountHooks {
  /** Makes the file at least `end` bytes long. */
  grow(end: number): Promise<void>;
  /** A cluster now holds metadata (refcount block or table): overlap protection must know. */
  metadata(cluster: number): void;
  /** Whether a cluster holds metadata (the allocator never hands those out). */
  isMetadata(cluster: number): boolean;
  /** Whether a cluster is referenced although its refcount may say free (never handed out). */
  inUse?(cluster: number): boolean;
}

export type { ClusterRun };

export class Refcounts {
  readonly bits: number;
  readonly perBlock: number;
  readonly max: number;
  private readonly cs: number;
  /** The refcount table, the whole of its clusters. */
  table: Buffer;
  tableOffset: number;
  tableClusters: number;
  /** The table as the header on disk names it, until a moved table is switched in. */
  diskTable: { offset: number; clusters: number };
  /** Loaded refcount blocks by table index. */
  readonly blocks = new Map<number, Buffer>();
  private readonly loading = new Map<number, Promise<Buffer>>();
  /** Blocks changed in memory: table index → dirty pages (`page` bytes each). */
  readonly dirtyBlocks = new Map<number, Set<number>>();
  /** Blocks are written back in pages of this size. */
  readonly page: number;
  readonly dirtyEntries = new Set<number>();
  /** Decrements waiting until no reference on disk needs the cluster (cluster indices, repeated per reference). */
  deferred: number[] = [];
  /** Clusters handed out but not yet counted: allocation must skip them. */
  private readonly reserved = new Set<number>();
  /** Lowest cluster that may be free. */
  freeHint = 0;
  /** End of the space in use or handed out (bytes): clusters at or past it are free. */
  hostEnd: number;
  /** Clusters from here on were never handed out: the file holds zeroes there (it only grows by ftruncate). */
  private zeroFrom: number;
  hooks: RefcountHooks | undefined;
  /** Clusters counted ahead for allocation (pool.ts). */
  readonly pool: AllocationPool;

  constructor(
    h: Qcow2Header,
    table: Buffer,
    private readonly file: BlockNode,
    private fileLength: number,
    private readonly path: string,
  ) {
    this.cs = h.clusterSize;
    this.bits = 2 ** h.refcountOrder;
    this.perBlock = (h.clusterSize * 8) / this.bits;
    this.max = this.bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.bits - 1;
    this.page = Math.min(TABLE_PAGE, this.cs);
    this.table = table;
    this.tableOffset = h.refcountTableOffset;
    this.tableClusters = h.refcountTableClusters;
    this.diskTable = { offset: this.tableOffset, clusters: this.tableClusters };
    this.hostEnd = Math.ceil(fileLength / this.cs) * this.cs;
    this.zeroFrom = this.hostEnd;
    this.pool = new AllocationPool(h, (n) => this.count(n));
  }

  /** Tells the reader the file grew (blocks may now lie further out); the space handed out stays where it is. */
  setFileLength(n: number): void {
    this.fileLength = n;
  }

  /** Number of entries in the refcount table. */
  get entries(): number {
    return this.table.length / 8;
  }

  /** The offset of refcount block `ti` (0 when none), checked. */
  blockOffset(ti: number): number {
    if (ti >= this.entries) return 0;
    const hi = this.table.readUInt32BE(ti * 8);
    const lo = this.table.readUInt32BE(ti * 8 + 4);
    if ((lo & 0x1ff) !== 0) throw this.corrupt(`refcount table entry ${ti} has reserved bits set`);
    const off = hi * TWO32 + ((lo & 0xfffffe00) >>> 0);
    if (off === 0) return 0;
    if (off % this.cs !== 0 || off + this.cs > Math.max(this.fileLength, this.hostEnd)) {
      throw this.corrupt(`refcount block ${ti} at ${off} is unaligned or beyond the end of the file`);
    }
    return off;
  }

  private setEntry(ti: number, off: number): void {
    this.table.writeUInt32BE(Math.floor(off / TWO32), ti * 8);
    this.table.writeUInt32BE((off % TWO32) >>> 0, ti * 8 + 4);
    this.dirtyEntries.add(ti);
  }

  /** The loaded block `ti`, undefined when the table has no block there. */
  async block(ti: number): Promise<Buffer | undefined> {
    const b = this.blocks.get(ti);
    if (b !== undefined) return b;
    const off = this.blockOffset(ti);
    if (off === 0) return undefined;
    let p = this.loading.get(ti);
    if (p === undefined) {
      p = (async () => {
        const buf = Buffer.allocUnsafe(this.cs);
        await this.file.read(off, buf);
        this.blocks.set(ti, buf);
        this.loading.delete(ti);
        return buf;
      })();
      this.loading.set(ti, p);
    }
    return p;
  }

  /** The refcount of the host cluster containing `hostOffset` (0 when no refcount block covers it). */
  async get(hostOffset: number): Promise<number> {
    return this.getCluster(Math.floor(hostOffset / this.cs));
  }

  /** The refcount of host cluster `c`. */
  async getCluster(c: number): Promise<number> {
    const ti = Math.floor(c / this.perBlock);
    const b = this.blocks.get(ti) ?? (await this.block(ti));
    return b === undefined ? 0 : this.read(b, c % this.perBlock);
  }

  /** Reads entry i of a block. */
  read(block: Buffer, i: number): number {
    switch (this.bits) {
      case 64:
        return Number(block.readBigUInt64BE(i * 8));
      case 32:
        return block.readUInt32BE(i * 4);
      case 16:
        return block.readUInt16BE(i * 2);
      case 8:
        return block[i]!;
      default: {
        const perByte = 8 / this.bits;
        const byte = block[Math.floor(i / perByte)]!;
        return (byte >> ((i % perByte) * this.bits)) & ((1 << this.bits) - 1);
      }
    }
  }

  /** Writes entry i of a block. */
  write(block: Buffer, i: number, v: number): void {
    switch (this.bits) {
      case 64:
        block.writeBigUInt64BE(BigInt(v), i * 8);
        return;
      case 32:
        block.writeUInt32BE(v, i * 4);
        return;
      case 16:
        block.writeUInt16BE(v, i * 2);
        return;
      case 8:
        block[i] = v;
        return;
      default: {
        const perByte = 8 / this.bits;
        const at = Math.floor(i / perByte);
        const shift = (i % perByte) * this.bits;
        const mask = ((1 << this.bits) - 1) << shift;
        block[at] = (block[at]! & ~mask) | (v << shift);
      }
    }
  }

  /** Adds `delta` to the refcount of cluster `c` in memory (creating its block when needed). */
  async adjust(c: number, delta: number): Promise<number> {
    const ti = Math.floor(c / this.perBlock);
    const b = this.blocks.get(ti) ?? (await this.block(ti)) ?? (await this.createBlock(ti));
    const i = c % this.perBlock;
    const v = this.read(b, i) + delta;
    if (v < 0 || v > this.max) {
      throw this.corrupt(`refcount of cluster ${c} would become ${v} (refcount_bits ${this.bits})`);
    }
    this.write(b, i, v);
    this.markDirty(ti, Math.floor((i * this.bits) / 8 / this.page));
    if (v === 0 && c < this.freeHint) this.freeHint = c;
    return v;
  }

  /** Marks page `page` of block `ti` dirty. */
  markDirty(ti: number, page: number): void {
    let pages = this.dirtyBlocks.get(ti);
    if (pages === undefined) {
      pages = new Set();
      this.dirtyBlocks.set(ti, pages);
    }
    pages.add(page);
  }

  /** Finds the first run of free clusters (up to n long) at or after freeHint. */
  private async findFree(n: number): Promise<ClusterRun> {
    let c = this.freeHint;
    let start = -1;
    for (;;) {
      if (c * this.cs >= this.hostEnd) {
        if (start < 0) start = c;
        return { start, count: n, fresh: false };
      }
      const ti = Math.floor(c / this.perBlock);
      const b = this.blocks.get(ti) ?? (await this.block(ti));
      const free = !this.reserved.has(c) && (b === undefined || this.read(b, c % this.perBlock) === 0);
      if (free && this.hooks?.isMetadata(c)) {
        throw this.corrupt(`cluster ${c} holds metadata but its refcount is 0`);
      }
      if (free && this.hooks?.inUse?.(c) !== true) {
        if (start < 0) start = c;
        if (c - start + 1 === n) return { start, count: n, fresh: false };
      } else if (start >= 0) {
        return { start, count: c - start, fresh: false };
      }
      c++;
    }
  }

  /**
   * Hands out up to n contiguous clusters with refcount 1 (in memory); the
   * file is grown to hold them. They come from the pool (pool.ts), so that
   * an allocating write usually needs no refcount write and no sync of its
   * own; `pooled` false counts exactly these clusters now (the L1 table of a
   * resize).
   */
  allocate(n: number, pooled = true): Promise<ClusterRun> {
    return pooled ? this.pool.take(n) : this.pool.exact(n);
  }

  /**
   * Gives the pool back (clean close, reopen read-only): the refcounts drop at
   * once, as nothing points at these clusters; a run at the end of the used
   * space shortens it, so the file can be truncated.
   */
  async releasePool(): Promise<void> {
    const runs = this.pool.drain();
    runs.sort((a, b) => b.start - a.start);
    for (const r of runs) {
      for (let i = 0; i < r.count; i++) await this.adjust(r.start + i, -1);
      const end = (r.start + r.count) * this.cs;
      if (end === this.hostEnd) {
        this.hostEnd = r.start * this.cs;
        if (r.fresh && this.zeroFrom === end) this.zeroFrom = this.hostEnd;
      }
    }
  }

  /**
   * Moves hostEnd past every cluster a refcount block counts beyond the end
   * of the file. A writer counts clusters ahead of the file (pool.ts) and
   * grows the file with ftruncate; after a power loss the refcount block can
   * be on disk and the growth not, and findFree takes everything past
   * hostEnd as free: it would hand those clusters out again (refcount 2
   * under a COPIED entry). Only the blocks covering clusters past the end
   * are read (usually none or one); called before the first allocation.
   */
  async coverCountedBeyondEnd(): Promise<void> {
    const first = Math.ceil(this.hostEnd / this.cs);
    for (let ti = this.entries - 1; ti >= Math.floor(first / this.perBlock); ti--) {
      const b = await this.block(ti);
      if (b === undefined) continue;
      for (let i = this.perBlock - 1; i >= 0 && ti * this.perBlock + i >= first; i--) {
        if (this.read(b, i) !== 0) {
          this.hostEnd = (ti * this.perBlock + i + 1) * this.cs;
          return;
        }
      }
    }
  }

  /** Counts up to n contiguous free clusters (refcount 1 in memory), growing the file to hold them. */
  private async count(n: number): Promise<ClusterRun> {
    const hint = this.freeHint;
    const run = await this.findFree(n);
    for (let i = 0; i < run.count; i++) this.reserved.add(run.start + i);
    try {
      const end = (run.start + run.count) * this.cs;
      run.fresh = run.start * this.cs >= this.zeroFrom;
      this.zeroFrom = Math.max(this.zeroFrom, end);
      if (end > this.hostEnd) this.hostEnd = end;
      await this.hooks?.grow(this.hostEnd);
      for (let i = 0; i < run.count; i++) await this.adjust(run.start + i, 1);
    } finally {
      for (let i = 0; i < run.count; i++) this.reserved.delete(run.start + i);
    }
    // Everything from the hint up to the run is in use; keep a lower hint a free set meanwhile.
    if (this.freeHint === hint) this.freeHint = run.start + run.count;
    return run;
  }

  /** Creates refcount block `ti` in memory (growing the table when it is too short). */
  private async createBlock(ti: number): Promise<Buffer> {
    if (ti >= this.entries) await this.growTable(ti + 1);
    const existing = this.blocks.get(ti) ?? (await this.block(ti));
    if (existing !== undefined) return existing; // growing the table may have created it
    const run = await this.findFree(1);
    const c = run.start;
    this.reserved.add(c);
    try {
      if ((c + 1) * this.cs > this.hostEnd) this.hostEnd = (c + 1) * this.cs;
      this.zeroFrom = Math.max(this.zeroFrom, (c + 1) * this.cs);
      await this.hooks?.grow(this.hostEnd);
      const b = Buffer.alloc(this.cs);
      this.blocks.set(ti, b);
      this.setEntry(ti, c * this.cs);
      // A new block is written whole: the cluster's old bytes are not refcounts.
      for (let p = 0; p < this.cs / this.page; p++) this.markDirty(ti, p);
      this.hooks?.metadata(c);
      await this.adjust(c, 1);
      return b;
    } finally {
      this.reserved.delete(c);
    }
  }

  /** Moves the table to a larger place at the end of the image; the old clusters are freed after the switch. */
  private async growTable(minEntries: number): Promise<void> {
    const want = Math.max(minEntries, this.entries * 2) * 8;
    const clusters = Math.ceil(want / this.cs);
    if (clusters * this.cs > MAX_REFCOUNT_TABLE_BYTES) {
      throw new BlkError(
        'IMAGE_TOO_LARGE',
        'the refcount table would exceed 8 MiB',
        { file: this.path, field: 'refcount_table_clusters' },
        { errno: Errno.ENOSPC },
      );
    }
    const start = Math.ceil(this.hostEnd / this.cs);
    for (let i = 0; i < clusters; i++) this.reserved.add(start + i);
    try {
      this.hostEnd = (start + clusters) * this.cs;
      this.zeroFrom = Math.max(this.zeroFrom, this.hostEnd);
      await this.hooks?.grow(this.hostEnd);
      const table = Buffer.alloc(clusters * this.cs);
      this.table.copy(table);
      const old = { offset: this.tableOffset, clusters: this.tableClusters };
      this.table = table;
      this.tableOffset = start * this.cs;
      this.tableClusters = clusters;
      for (let i = 0; i < this.entries; i++) if (this.blockOffset(i) !== 0) this.dirtyEntries.add(i);
      for (let i = 0; i < clusters; i++) {
        this.hooks?.metadata(start + i);
        await this.adjust(start + i, 1);
      }
      // The old table stays referenced by the header on disk until the switch.
      const firstOld = old.offset / this.cs;
      for (let i = 0; i < old.clusters; i++) this.deferred.push(firstOld + i);
    } finally {
      for (let i = 0; i < clusters; i++) this.reserved.delete(start + i);
    }
  }

  private corrupt(msg: string): BlkError {
    return new BlkError(
      'IMAGE_CORRUPT',
      msg,
      { file: this.path, field: 'refcount_table' },
      { errno: Errno.EIO },
    );
  }

  /** The file this reader reads refcount blocks from. */
  get node(): BlockNode {
    return this.file;
  }
}
