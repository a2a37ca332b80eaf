/**
 * Host extents of guest ranges from cached L2 tables only, for the FUSE fast
 * path (BlockNode.mapHostCached): data clusters map to the data file,
 * zero/unallocated ones to zeroes or to the backing node's own mapping,
 * compressed ones to their compressed bytes in the image file (for the
 * binding to inflate); uncached tables, corrupt images and bad entries
 * answer null (without marking the image corrupt: only a read or write that
 * reaches the entry does).
 *
 * A data piece is `writable` (the FUSE worker threads may overwrite it with
 * pwrite, no JavaScript involved) only when a write there is exactly what
 * writeGuest's in-place path would do: the node is writable and prepared
 * (dirty-bit repair, bitmaps marked in use, done by prepareWritable before
 * any write), the L2 table is not shared (L1 COPIED), the cluster is
 * allocated with COPIED set (refcount 1), not compressed, not zero-flagged,
 * every subcluster touched allocated (extended L2), neither it nor its L2
 * table is shared beyond its refcount (shared.ts), no allocating write has
 * it in flight, its entries are already in the file (entriesInFile), and the
 * host range lies inside the file and clear of metadata. Backing-file pieces
 * never are: a write there allocates in this image.
 */
import type { HostExtent } from '../../types.js';
import { entriesInFile } from './commit.js';
import { readL1Entry, readL2Entry } from './entries.js';
import { COMPRESSED, DATA, type MappedExtent, mapRangeCached, UNALLOCATED, ZERO } from './mapping.js';
import type { Qcow2State } from './state.js';

/** Appends `more` to `out` (merging contiguous pieces alike in writability); false when `more` is null. */
function append(out: HostExtent[], more: HostExtent[] | null | undefined, writable = true): boolean {
  if (!more) return false;
  for (const y of more) {
    const x = 'fd' in y && y.writable && !writable ? { ...y, writable: false } : y;
    const last = out[out.length - 1];
    if (last && 'zero' in last && 'zero' in x) last.length += x.length;
    else if (
      last &&
      'fd' in last &&
      'fd' in x &&
      last.fd === x.fd &&
      last.host + last.length === x.host &&
      (last.writable ?? false) === (x.writable ?? false)
    )
      last.length += x.length;
    else out.push({ ...x });
  }
  return true;
}

/** Whether guest [pos, pos+len), inside one cluster mapped as data at `host`, may be overwritten in place. */
function inPlace(s: Qcow2State, pos: number, len: number, host: number): boolean {
  const w = s.w;
  if (w === undefined || s.readOnly || s.corrupt || s.externalData) return false;
  const h = s.header;
  const cs = h.clusterSize;
  const gc = Math.floor(pos / cs);
  if (w.inflight.size > 0 && w.inflight.has(gc)) return false;
  const l1i = Math.floor(pos / h.l2Coverage);
  const { off, copied } = readL1Entry(s, l1i);
  if (off === 0 || !copied) return false;
  // A host cluster (or table) the references show shared is written by no one (shared.ts).
  if (w.shared.size > 0 && (w.shared.has(off / cs) || w.shared.has(Math.floor(host / cs)))) return false;
  const table = s.l2Cache.peek(off);
  if (table === undefined) return false;
  // A corrupt entry throws (and marks the image corrupt): mapHostCached undoes the mark and answers null,
  // and the JavaScript path that reaches the entry reports it.
  const e = readL2Entry(s, table, gc - l1i * h.l2Entries, gc);
  if (e.compressed || e.host === 0 || !e.copied || e.zero) return false;
  // mapRangeCached gave DATA only for allocated subclusters; the host must agree with the entry.
  if (e.host + (pos - gc * cs) !== host) return false;
  if (host + len > s.file.length()) return false;
  for (let c = Math.floor(host / cs); c * cs < host + len; c++) if (w.meta.has(c)) return false;
  return entriesInFile(s, pos, len);
}

/** Appends a data extent, split per cluster into pieces that are or are not writable in place. */
function appendData(s: Qcow2State, out: HostExtent[], pos: number, x: MappedExtent): boolean {
  const cs = s.header.clusterSize;
  const end = pos + x.length;
  for (let p = pos; p < end; ) {
    const n = Math.min(end, (Math.floor(p / cs) + 1) * cs) - p;
    const host = x.host + (p - pos);
    if (!append(out, s.data.mapHostCached?.(host, n), inPlace(s, p, n, host))) return false;
    p += n;
  }
  return true;
}

/** The host extents of guest [offset, offset+length), or null when caches cannot tell. */
export function mapHostCached(s: Qcow2State, offset: number, length: number): HostExtent[] | null {
  if (s.corrupt) return null;
  // While an allocating write, zeroing, discard or resize holds the lock, mappings are in flux.
  const lock = s.w?.lock;
  if (lock && !lock.tryShared()) return null;
  try {
    return mapHost(s, offset, length);
  } catch {
    // A bad entry: the caller maps speculatively (around a read), so the read that reaches it reports it.
    s.corrupt = false;
    return null;
  } finally {
    lock?.releaseShared();
  }
}

/** A compressed cluster's piece: where its compressed bytes lie in the image file, and how to inflate them. */
function compressedHost(s: Qcow2State, x: MappedExtent): HostExtent[] | null {
  const file = s.file.mapHostCached?.(x.host, x.clen);
  const at = file?.length === 1 ? file[0] : undefined;
  if (!at || !('fd' in at)) return null;
  const compressed = {
    fd: at.fd,
    host: at.host,
    clen: x.clen,
    clusterSize: s.header.clusterSize,
    skip: x.skip,
    algorithm: s.header.compressionType,
  };
  return [{ length: x.length, compressed }];
}

function mapHost(s: Qcow2State, offset: number, length: number): HostExtent[] | null {
  const extents: MappedExtent[] = [];
  if (!mapRangeCached(s, offset, length, extents)) return null;
  const out: HostExtent[] = [];
  let pos = offset;
  for (const x of extents) {
    switch (x.kind) {
      case DATA:
        if (!appendData(s, out, pos, x)) return null;
        break;
      case ZERO:
        append(out, [{ length: x.length, zero: true }]);
        break;
      case UNALLOCATED: {
        const backing = s.backing;
        if (backing === null) {
          append(out, [{ length: x.length, zero: true }]);
          break;
        }
        const avail = Math.max(0, Math.min(x.length, backing.length() - pos));
        if (avail > 0 && !append(out, backing.mapHostCached?.(pos, avail), false)) return null;
        if (avail < x.length) append(out, [{ length: x.length - avail, zero: true }]);
        break;
      }
      case COMPRESSED:
        if (!append(out, compressedHost(s, x))) return null;
        break;
    }
    pos += x.length;
  }
  return out;
}
