/**
 * Host extents of guest ranges from cached L2 tables only, for the FUSE fast
 * path (BlockNode.mapHostCached): data clusters map to the data file,
 * zero/unallocated ones to zeroes or to the backing node's own mapping,
 * compressed ones to their compressed bytes in the image file (for the
 * binding to inflate); uncached tables, corrupt images and bad entries
 * answer null (without marking the image corrupt: only a read or write that
 * reaches the entry does).
 */
import type { HostExtent } from '../../types.js';
import { COMPRESSED, DATA, type MappedExtent, mapRangeCached, UNALLOCATED, ZERO } from './mapping.js';
import type { Qcow2State } from './state.js';

/** Appends `more` to `out` (merging contiguous pieces); false when `more` is null. */
function append(out: HostExtent[], more: HostExtent[] | null | undefined): boolean {
  if (!more) return false;
  for (const x of more) {
    const last = out[out.length - 1];
    if (last && 'zero' in last && 'zero' in x) last.length += x.length;
    else if (last && 'fd' in last && 'fd' in x && last.fd === x.fd && last.host + last.length === x.host)
      last.length += x.length;
    else out.push({ ...x });
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
        if (!append(out, s.data.mapHostCached?.(x.host, x.length))) return null;
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
        if (avail > 0 && !append(out, backing.mapHostCached?.(pos, avail))) return null;
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
