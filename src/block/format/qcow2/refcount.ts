/**
 * Reading refcounts: the refcount table (read at open, ≤ 8 MiB and inside
 * the file) points at refcount blocks, cached like L2 tables. Entries are
 * refcount_bits wide (1..64), packed from the least significant bit.
 */
import { BlkError } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import type { Qcow2Header } from './header.js';
import { TableCache } from './table-cache.js';

const TWO32 = 2 ** 32;

export class RefcountReader {
  private readonly cache: TableCache;
  private readonly bits: number;
  private readonly perBlock: number;

  constructor(
    private readonly h: Qcow2Header,
    private readonly table: Buffer,
    private readonly file: BlockNode,
    private readonly fileLength: number,
    private readonly path: string,
    cacheBytes = 1024 * 1024,
  ) {
    this.bits = 2 ** h.refcountOrder;
    this.perBlock = (h.clusterSize * 8) / this.bits;
    this.cache = new TableCache(cacheBytes, async (off) => {
      const b = Buffer.allocUnsafe(h.clusterSize);
      await file.read(off, b);
      return b;
    });
  }

  /** The refcount of the host cluster containing `hostOffset` (0 when no refcount block covers it). */
  async get(hostOffset: number): Promise<number> {
    const cluster = Math.floor(hostOffset / this.h.clusterSize);
    const ti = Math.floor(cluster / this.perBlock);
    if (ti * 8 >= this.table.length) return 0;
    const hi = this.table.readUInt32BE(ti * 8);
    const lo = this.table.readUInt32BE(ti * 8 + 4);
    if ((lo & 0x1ff) !== 0) throw this.corrupt(`refcount table entry ${ti} has reserved bits set`);
    const off = hi * TWO32 + ((lo & 0xfffffe00) >>> 0);
    if (off === 0) return 0;
    if (off % this.h.clusterSize !== 0 || off + this.h.clusterSize > this.fileLength) {
      throw this.corrupt(`refcount block ${ti} at ${off} is unaligned or beyond the end of the file`);
    }
    const block = this.cache.peek(off) ?? (await this.cache.get(off));
    const i = cluster % this.perBlock;
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

  private corrupt(msg: string): BlkError {
    return new BlkError('IMAGE_CORRUPT', msg, { file: this.path, field: 'refcount_table' }, { errno: 5 });
  }

  /** The file this reader reads refcount blocks from. */
  get node(): BlockNode {
    return this.file;
  }
}
