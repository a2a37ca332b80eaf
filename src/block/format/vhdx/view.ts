/**
 * The image file as the rest of the driver reads it: the file child, plus
 * the sectors a replayed log wrote (kept in memory: a read-only open never
 * writes the file), plus zeroes from the end of the file up to the length
 * the log says the file has. Every metadata read and every payload read goes
 * through here, so a replayed log changes exactly what QEMU's replay on disk
 * would change.
 */
import type { BlockNode } from '../../types.js';
import { LOG_SECTOR } from './layout.js';

/** What a replayed log wrote: whole 4 KiB sectors and zeroed ranges, later writes winning. */
export interface Overlay {
  /** Sector index (file offset / 4 KiB) -> its bytes after replay. */
  readonly sectors: Map<number, Buffer>;
  /** Merged, sorted [start, end) byte ranges zeroed by the log (sectors above win over them). */
  readonly zeroes: [number, number][];
  /** Merged, sorted [start, end) byte ranges the log touched at all. */
  readonly touched: [number, number][];
}

/** Merges [start, end) ranges into a sorted list of disjoint ranges. */
export function mergeRanges(ranges: [number, number][]): [number, number][] {
  const sorted = ranges.filter(([a, b]) => b > a).sort((x, y) => x[0] - y[0]);
  const out: [number, number][] = [];
  for (const [a, b] of sorted) {
    const last = out[out.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

/** True when [off, off+len) intersects one of the sorted disjoint `ranges`. */
export function intersects(ranges: readonly [number, number][], off: number, len: number): boolean {
  let lo = 0;
  let hi = ranges.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (ranges[mid]![1] <= off) lo = mid + 1;
    else hi = mid;
  }
  return lo < ranges.length && ranges[lo]![0] < off + len;
}

export class FileView {
  constructor(
    readonly file: BlockNode,
    /** Bytes really in the file. */
    readonly fileLength: number,
    /** Bytes the file has after log replay (at least fileLength). */
    readonly length: number,
    readonly overlay: Overlay | null,
  ) {}

  /** True when the bytes at [off, off+len) are exactly the file's (no log overlay, not past its end). */
  plain(off: number, len: number): boolean {
    if (off + len > this.fileLength) return false;
    return this.overlay === null || !intersects(this.overlay.touched, off, len);
  }

  /** Fills `buf` with the bytes at `off`; the caller keeps [off, off+len) inside `length`. */
  async read(off: number, buf: Buffer): Promise<void> {
    const inFile = Math.max(0, Math.min(buf.length, this.fileLength - off));
    if (inFile > 0) await this.file.read(off, inFile === buf.length ? buf : buf.subarray(0, inFile));
    if (inFile < buf.length) buf.fill(0, inFile);
    const o = this.overlay;
    if (o === null || !intersects(o.touched, off, buf.length)) return;
    const end = off + buf.length;
    for (const [a, b] of o.zeroes) {
      if (b <= off || a >= end) continue;
      buf.fill(0, Math.max(a, off) - off, Math.min(b, end) - off);
    }
    for (let s = Math.floor(off / LOG_SECTOR); s * LOG_SECTOR < end; s++) {
      const data = o.sectors.get(s);
      if (data === undefined) continue;
      const from = Math.max(s * LOG_SECTOR, off);
      const to = Math.min((s + 1) * LOG_SECTOR, end);
      data.copy(buf, from - off, from - s * LOG_SECTOR, to - s * LOG_SECTOR);
    }
  }

  /** The bytes at [off, off+len) as a new buffer. */
  async bytes(off: number, len: number): Promise<Buffer> {
    const b = Buffer.alloc(len);
    await this.read(off, b);
    return b;
  }
}
