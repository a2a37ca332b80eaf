/**
 * The metadata log: finding the active sequence of log entries and replaying
 * it into memory. A writer journals each metadata change (BAT entries,
 * sector bitmaps, metadata) in the log before writing it in place; an image
 * whose writer stopped between the two has a log that must be replayed
 * before its metadata means anything. QEMU replays it into the file when it
 * opens the image read-write and refuses a read-only open; this driver
 * replays it into memory (view.ts) and never writes the file.
 *
 * The search follows QEMU's: scan the circular log sector by sector for a
 * valid entry (signature, the header's log GUID, a CRC-32C over the whole
 * entry), follow it by entries whose sequence numbers go up by one, and keep
 * the sequence whose newest entry has the largest sequence number. Every
 * sector is read a bounded number of times (an entry that fails its checksum
 * is skipped whole, as QEMU does), so a hostile log costs at most about twice
 * its length in reads.
 */
import type { BlockNode } from '../../types.js';
import { crc32cWithHole } from './crc32c.js';
import { corrupt, vhdxError } from './errors.js';
import type { VhdxHeader } from './header.js';
import { LOG_SECTOR, MiB } from './layout.js';
import { mergeRanges, type Overlay } from './view.js';

/** Largest single log entry accepted (QEMU and Hyper-V write entries of a few KiB). */
export const MAX_LOG_ENTRY_BYTES = 32 * MiB;
/** Most bytes a replayed log may hold in memory. */
export const MAX_REPLAY_BYTES = 64 * MiB;

/** One write a log entry describes: a 4 KiB sector of data, or a zeroed range. */
export interface LogWrite {
  offset: number;
  length: number;
  data: Buffer | null;
}

export interface LogEntry {
  /** Position in the log, in 4 KiB sectors. */
  sector: number;
  sectors: number;
  sequenceNumber: bigint;
  flushedFileOffset: number;
  lastFileOffset: number;
  writes: LogWrite[];
}

export interface ReplayedLog {
  overlay: Overlay;
  /** The file's length after replay (the log can extend it). */
  length: number;
  entries: number;
}

type Attempt = { entry: LogEntry } | { skip: number };

const isZero = (b: Buffer) => b.every((x) => x === 0);

function u64(b: Buffer, off: number): number {
  const v = b.readBigUInt64LE(off);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(v);
}

class LogRing {
  readonly sectors: number;
  constructor(
    private readonly file: BlockNode,
    readonly offset: number,
    readonly length: number,
  ) {
    this.sectors = length / LOG_SECTOR;
  }

  /** `n` sectors starting at sector `s` of the circular log. */
  async read(s: number, n: number): Promise<Buffer> {
    const out = Buffer.allocUnsafe(n * LOG_SECTOR);
    const first = s % this.sectors;
    const head = Math.min(n, this.sectors - first);
    await this.file.read(this.offset + first * LOG_SECTOR, out.subarray(0, head * LOG_SECTOR));
    if (head < n) await this.file.read(this.offset, out.subarray(head * LOG_SECTOR));
    return out;
  }
}

/** Sectors taken by an entry header and `count` descriptors (the header takes two descriptor slots). */
function descriptorSectors(count: number): number {
  return Math.ceil((count + 2) / 128);
}

/** The writes of a checksummed entry `e` (`count` descriptors, data sectors after `descSectors`). */
function decodeDescriptors(
  e: Buffer,
  count: number,
  descSectors: number,
  seq: bigint,
  file: string,
): LogWrite[] {
  const sectors = e.length / LOG_SECTOR;
  const writes: LogWrite[] = [];
  let data = descSectors;
  for (let i = 0; i < count; i++) {
    const d = 64 + 32 * i;
    const field = `log.descriptor[${i}]`;
    const sig = e.toString('latin1', d, d + 4);
    const offset = u64(e, d + 16);
    if (e.readBigUInt64LE(d + 24) !== seq)
      throw corrupt(file, field, 'descriptor sequence number differs from its entry');
    if (offset % LOG_SECTOR !== 0) throw corrupt(file, field, `file offset ${offset} is not 4 KiB aligned`);
    if (sig === 'zero') {
      const zlen = u64(e, d + 8);
      if (zlen % LOG_SECTOR !== 0)
        throw corrupt(file, field, `zero length ${zlen} is not a multiple of 4 KiB`);
      writes.push({ offset, length: zlen, data: null });
    } else if (sig === 'desc') {
      if (data >= sectors) throw corrupt(file, field, 'data descriptor without a data sector in its entry');
      writes.push({ offset, length: LOG_SECTOR, data: dataSector(e, d, data, seq, file, field) });
      data++;
    } else {
      throw corrupt(file, field, `unknown descriptor signature '${sig.replace(/[^\x20-\x7e]/g, '?')}'`);
    }
  }
  return writes;
}

/** The 4 KiB a data descriptor at `d` writes: its data sector `n` carries bytes 8..4091, the descriptor the first 8 and last 4. */
function dataSector(e: Buffer, d: number, n: number, seq: bigint, file: string, field: string): Buffer {
  const ds = e.subarray(n * LOG_SECTOR, (n + 1) * LOG_SECTOR);
  const dseq = (BigInt(ds.readUInt32LE(4)) << 32n) | BigInt(ds.readUInt32LE(LOG_SECTOR - 4));
  if (ds.toString('latin1', 0, 4) !== 'data' || dseq !== seq) {
    throw corrupt(file, field, 'data sector signature or sequence number is wrong');
  }
  const sector = Buffer.allocUnsafe(LOG_SECTOR);
  e.copy(sector, 0, d + 8, d + 16);
  ds.copy(sector, 8, 8, LOG_SECTOR - 4);
  e.copy(sector, LOG_SECTOR - 4, d + 4, d + 8);
  return sector;
}

/** Tries to read a valid entry at sector `s`; how far to skip when there is none. */
async function tryEntry(ring: LogRing, s: number, guid: Buffer, file: string): Promise<Attempt> {
  const h = await ring.read(s, 1);
  if (h.toString('latin1', 0, 4) !== 'loge' || !h.subarray(32, 48).equals(guid)) return { skip: 1 };
  const length = h.readUInt32LE(8);
  const seq = h.readBigUInt64LE(16);
  const count = h.readUInt32LE(24);
  if (seq === 0n || length === 0 || length % LOG_SECTOR !== 0 || length > ring.length) return { skip: 1 };
  const sectors = length / LOG_SECTOR;
  const descSectors = descriptorSectors(count);
  if (descSectors > sectors) return { skip: 1 };
  if (length > MAX_LOG_ENTRY_BYTES) {
    throw vhdxError(
      'IMAGE_UNSUPPORTED',
      file,
      'log.entry_length',
      `log entry of ${length} bytes is larger than the ${MAX_LOG_ENTRY_BYTES} bytes replayed in memory`,
    );
  }
  const e = await ring.read(s, sectors);
  if (crc32cWithHole(e, 4) !== e.readUInt32LE(4)) return { skip: sectors };
  // The checksum holds: anything wrong from here on is corruption, not a stale sector.
  const writes = decodeDescriptors(e, count, descSectors, seq, file);
  const entry: LogEntry = {
    sector: s,
    sectors,
    sequenceNumber: seq,
    flushedFileOffset: u64(h, 48),
    lastFileOffset: u64(h, 56),
    writes,
  };
  return { entry };
}

/** The active log sequence (oldest entry first), or [] when the log holds none. */
export async function findActiveSequence(
  file: BlockNode,
  header: VhdxHeader,
  path: string,
): Promise<LogEntry[]> {
  const ring = new LogRing(file, header.logOffset, header.logLength);
  let best: LogEntry[] = [];
  for (let s = 0; s < ring.sectors; ) {
    const a = await tryEntry(ring, s, header.logGuid, path);
    if ('skip' in a) {
      s += a.skip;
      continue;
    }
    const seq = [a.entry];
    let total = a.entry.sectors;
    while (total < ring.sectors) {
      const next = await tryEntry(ring, s + total, header.logGuid, path);
      if ('skip' in next || next.entry.sequenceNumber !== seq[seq.length - 1]!.sequenceNumber + 1n) break;
      seq.push(next.entry);
      total += next.entry.sectors;
    }
    if (best.length === 0 || seq[seq.length - 1]!.sequenceNumber > best[best.length - 1]!.sequenceNumber) {
      best = seq;
    }
    s += total;
  }
  return best;
}

/**
 * Replays the log of `header` into memory; null when the log is empty (a
 * zero log GUID, a zero length, or no valid entry).
 */
export async function replayLog(
  file: BlockNode,
  fileLength: number,
  header: VhdxHeader,
  path: string,
): Promise<ReplayedLog | null> {
  if (isZero(header.logGuid) || header.logLength === 0) return null;
  if (header.logLength % MiB !== 0) {
    throw corrupt(path, 'header.log_length', `log length ${header.logLength} is not a multiple of 1 MiB`);
  }
  if (header.logOffset + header.logLength > fileLength) {
    throw corrupt(path, 'header.log_offset', 'the log lies past the end of the file');
  }
  const entries = await findActiveSequence(file, header, path);
  if (entries.length === 0) return null;
  const length = replayedLength(entries, fileLength, path);
  return { overlay: buildOverlay(entries, length, path), length, entries: entries.length };
}

/** The file length after replaying `entries`, after checking the file holds what they need and the data fits in memory. */
function replayedLength(entries: LogEntry[], fileLength: number, path: string): number {
  let length = fileLength;
  let bytes = 0;
  for (const e of entries) {
    if (e.flushedFileOffset > fileLength) {
      throw corrupt(
        path,
        'log.flushed_file_offset',
        `the log needs ${e.flushedFileOffset} bytes of file but the file has ${fileLength} (truncated?)`,
      );
    }
    if (e.lastFileOffset > length) length = e.lastFileOffset;
    for (const w of e.writes) if (w.data) bytes += w.data.length;
  }
  if (!Number.isSafeInteger(length)) {
    throw corrupt(path, 'log.last_file_offset', 'the log names an impossible file length');
  }
  if (bytes > MAX_REPLAY_BYTES) {
    throw vhdxError(
      'IMAGE_UNSUPPORTED',
      path,
      'log',
      `the log holds ${bytes} bytes of data, more than the ${MAX_REPLAY_BYTES} replayed in memory`,
    );
  }
  return length;
}

/** The overlay `entries` leave, oldest first: later writes win over earlier ones. */
function buildOverlay(entries: LogEntry[], length: number, path: string): Overlay {
  const sectors = new Map<number, Buffer>();
  const zeroes: [number, number][] = [];
  for (const e of entries) {
    for (const w of e.writes) {
      if (w.offset + w.length > length) {
        throw corrupt(
          path,
          'log.descriptor',
          `the log writes ${w.length} bytes at ${w.offset}, past the end of the file (${length})`,
        );
      }
      if (w.data) {
        sectors.set(w.offset / LOG_SECTOR, w.data);
        continue;
      }
      for (const k of sectors.keys()) {
        if (k * LOG_SECTOR >= w.offset && k * LOG_SECTOR < w.offset + w.length) sectors.delete(k);
      }
      zeroes.push([w.offset, w.offset + w.length]);
    }
  }
  const merged = mergeRanges(zeroes);
  const touched = mergeRanges([
    ...merged.map(([a, b]) => [a, b] as [number, number]),
    ...[...sectors.keys()].map((k) => [k * LOG_SECTOR, (k + 1) * LOG_SECTOR] as [number, number]),
  ]);
  return { sectors, zeroes: merged, touched };
}
