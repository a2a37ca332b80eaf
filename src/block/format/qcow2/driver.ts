/**
 * The qcow2 format driver (read path). Split by concern: header.ts and
 * extensions.ts parse and validate, mapping.ts decodes L1/L2 entries,
 * table-cache.ts caches tables, decompress.ts handles compressed clusters,
 * refcount.ts and snapshots.ts read those tables, backing.ts opens the
 * backing chain, read.ts reads; write.ts, zero.ts, resize.ts and
 * metadata-cache.ts write (see docs/qcow2.md for the crash-safety scheme).
 */

import { BlkError } from '../../../errors.js';
import { defineDriver, type OpenContext } from '../../driver.js';
import { DEFAULT_L2_CACHE_BYTES } from '../../limits.js';
import { confinement, resolveImplicitFile } from '../../path-policy.js';
import type { BlockExtent, BlockNode, ImageInfo } from '../../types.js';
import { openBacking } from './backing.js';
import { readBitmaps } from './bitmaps.js';
import { writeBack } from './commit.js';
import { parseExtensions } from './extensions.js';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  parseHeader,
  type Qcow2Header,
  roundUp,
} from './header.js';
import { markCorrupt, setDirtyBit } from './header-write.js';
import { registerQcow2Node } from './inspect.js';
import { mapHostCached } from './map-host.js';
import { COMPRESSED, DATA, type MappedExtent, mapRange, UNALLOCATED, ZERO } from './mapping.js';
import { readGuest } from './read.js';
import { Refcounts } from './refcount.js';
import { resizeImage } from './resize.js';
import { readSnapshotL1, selectSnapshot, snapshotViewReadOnly } from './snapshot-view.js';
import { type Qcow2Snapshot, readSnapshots } from './snapshots.js';
import type { Qcow2State, WriteState } from './state.js';
import { TableCache } from './table-cache.js';
import { prepareWritable, refuseWriting } from './writable.js';
import { exclusiveQuiet, writeGuest } from './write.js';
import { discardGuest, writeZeroesGuest } from './zero.js';

/** Decompressed clusters kept (bytes), at least two clusters. */
const COMPRESSED_CACHE_BYTES = 4 * 1024 * 1024;

async function readAt(node: BlockNode, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.allocUnsafe(length);
  await node.read(offset, b);
  return b;
}

/**
 * The L1 table reads go through: only the entries that map the virtual size (bounded by the file and
 * 32 MiB), the active one's or, for a snapshot view (option `snapshot`), the snapshot's.
 */
async function readL1(
  ctx: OpenContext,
  file: BlockNode,
  header: Qcow2Header,
  snapshots: readonly Qcow2Snapshot[],
  path: string,
): Promise<{ l1: Buffer; view: Qcow2Snapshot | undefined }> {
  const want = ctx.options.snapshot;
  if (want === undefined) {
    const l1 =
      header.l1Needed > 0 ? await readAt(file, header.l1TableOffset, header.l1Needed * 8) : Buffer.alloc(0);
    return { l1, view: undefined };
  }
  const view = selectSnapshot(snapshots, want, path);
  if (!ctx.readOnly) throw snapshotViewReadOnly(path, view);
  return { l1: await readSnapshotL1(file, header, view), view };
}

async function openQcow2(ctx: OpenContext): Promise<Qcow2State> {
  const file = ctx.file;
  if (!file) throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver qcow2 needs a file child`);
  const path = file.filename ?? ctx.nodeName;
  if (file.fileKey !== undefined && ctx.chain.seen.has(file.fileKey)) {
    throw new BlkError('BACKING_CHAIN', 'backing chain loops back to an image already in the chain', {
      file: path,
      field: 'backing_file_offset',
    });
  }
  const fileLength = file.length();
  // Cluster 0 holds the header, the extensions and the backing file name.
  const first = await readAt(file, 0, Math.min(fileLength, 512));
  const bits = first.length >= 24 ? first.readUInt32BE(20) : 0;
  const head =
    bits >= MIN_CLUSTER_BITS && bits <= MAX_CLUSTER_BITS && fileLength > 512
      ? await readAt(file, 0, Math.min(fileLength, 2 ** bits))
      : first;
  const header = parseHeader(head, fileLength, path);
  const ext = parseExtensions(head, header, path);
  const cs = header.clusterSize;

  const rtBytes = header.refcountTableClusters * cs;
  const refTable = await readAt(file, header.refcountTableOffset, rtBytes);
  const { snapshots, tableBytes } = await readSnapshots(header, file, fileLength, path);
  const { l1, view } = await readL1(ctx, file, header, snapshots, path);
  const bitmaps = await readBitmaps(header, ext, file, fileLength, path);

  const metadata: [string, number, number][] = [['header', 0, cs]];
  if (header.l1Size > 0) {
    metadata.push(['L1 table', header.l1TableOffset, header.l1TableOffset + roundUp(header.l1Size * 8, cs)]);
  }
  metadata.push(['refcount table', header.refcountTableOffset, header.refcountTableOffset + rtBytes]);
  if (tableBytes > 0) {
    const snapEnd = header.snapshotsOffset + roundUp(tableBytes, cs);
    for (const [name, start, end] of metadata) {
      if (header.snapshotsOffset < end && snapEnd > start) {
        throw new BlkError('IMAGE_INVALID', `snapshot table overlaps the ${name}`, {
          file: path,
          field: 'snapshots_offset',
        });
      }
    }
    metadata.push(['snapshot table', header.snapshotsOffset, snapEnd]);
  }

  // External data file: only with a recorded name, only inside the allowed roots.
  const externalData = (header.incompatible & INCOMPAT_DATA_FILE) !== 0n;
  let data: BlockNode = file;
  if (externalData) {
    if (ext.dataFile === undefined) {
      throw new BlkError(
        'IMAGE_UNSUPPORTED',
        'the image uses an external data file but records no name for it',
        {
          file: path,
          field: 'data_file',
        },
      );
    }
    const real = await resolveImplicitFile(ctx.policy, path, ext.dataFile, 'data file', 'data_file');
    data = await ctx.openChild(
      { driver: 'file', filename: real, readOnly: true, ...confinement(ctx.policy) },
      ctx.chain,
    );
  }

  const state: Qcow2State = {
    path,
    header,
    ext,
    file,
    fileLength,
    data,
    dataLength: data.length(),
    externalData,
    backing: null,
    l1,
    snapshotView: view,
    l2Cache: new TableCache(ctx.options.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES, (off) =>
      readAt(file, off, cs),
    ),
    compressedCache: new TableCache(Math.max(COMPRESSED_CACHE_BYTES, 2 * cs), () =>
      Promise.reject(new BlkError('INTERNAL', 'compressed clusters are loaded with their descriptor')),
    ),
    refcounts: new Refcounts(header, refTable, file, fileLength, path),
    snapshots,
    bitmaps,
    metadata,
    corrupt: false,
    repairing: false,
    readOnly: ctx.readOnly,
    w: undefined,
  };
  state.backing = await openBacking(ctx, file, ext);
  if (!ctx.readOnly) await prepareWritable(state);
  return state;
}

function info(s: Qcow2State): ImageInfo {
  const h = s.header;
  const data: Record<string, unknown> = {
    compat: h.version === 2 ? '0.10' : '1.1',
    'compression-type': h.compressionType,
  };
  if (h.version === 3) {
    data['lazy-refcounts'] = (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n;
    if (s.bitmaps.length > 0) {
      data.bitmaps = s.bitmaps.map((b) => ({ flags: b.flags, name: b.name, granularity: b.granularity }));
    }
  }
  data['refcount-bits'] = 2 ** h.refcountOrder;
  if (h.version === 3) {
    if (s.externalData) {
      if (s.ext.dataFile !== undefined) data['data-file'] = s.ext.dataFile;
      data['data-file-raw'] = (h.autoclear & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    }
    data.corrupt = (h.incompatible & INCOMPAT_CORRUPT) !== 0n || s.corrupt;
    data['extended-l2'] = h.extendedL2;
  }
  return {
    format: 'qcow2',
    virtualSize: h.size,
    clusterSize: h.clusterSize,
    dirty: (h.incompatible & INCOMPAT_DIRTY) !== 0n,
    backingFilename: s.ext.backingFile,
    backingFormat: s.ext.backingFormat,
    snapshots: s.snapshots.map((sn) => ({
      id: sn.id,
      name: sn.name,
      vmStateSize: sn.vmStateSize,
      dateSec: sn.dateSec,
      dateNsec: sn.dateNsec,
      vmClockNsec: sn.vmClockNsec,
      icount: sn.icount,
    })),
    formatSpecific: { type: 'qcow2', data },
  };
}

async function blockStatus(s: Qcow2State, offset: number, length: number): Promise<BlockExtent> {
  // Look at most one L2 table ahead: enough for SEEK_DATA/SEEK_HOLE, bounded work per call.
  const span = Math.min(length, s.header.l2Coverage - (offset % s.header.l2Coverage));
  const extents: MappedExtent[] = [];
  await mapRange(s, offset, span, extents);
  const first = extents[0]!;
  if (first.kind === UNALLOCATED && s.backing !== null) {
    if (offset >= s.backing.length())
      return { offset, length: first.length, data: false, zero: true, depth: 0 };
    const b = await s.backing.blockStatus(offset, Math.min(first.length, s.backing.length() - offset));
    const below = b.depth ?? (b.data ? 1 : 0);
    return { offset, length: b.length, data: b.data, zero: b.zero, depth: below ? below + 1 : 0 };
  }
  const data = first.kind === DATA || first.kind === COMPRESSED;
  const zero = first.kind === ZERO || first.kind === UNALLOCATED;
  return { offset, length: first.length, data, zero, depth: first.kind === UNALLOCATED ? 0 : 1 };
}

/** The write state, prepared once (on the first write after a reopen read-write). */
function writable(s: Qcow2State): Promise<WriteState> | WriteState {
  return s.w ?? preparing.get(s) ?? startPreparing(s);
}

const preparing = new WeakMap<Qcow2State, Promise<WriteState>>();

function startPreparing(s: Qcow2State): Promise<WriteState> {
  const p = prepareWritable(s).finally(() => preparing.delete(s));
  preparing.set(s, p);
  return p;
}

async function readLocked(s: Qcow2State, offset: number, buf: Buffer): Promise<void> {
  const w = s.w;
  if (w === undefined) return readGuest(s, offset, buf);
  if (!w.lock.tryShared()) await w.lock.shared();
  try {
    await readGuest(s, offset, buf);
  } catch (e) {
    await flagCorrupt(s, e);
    throw e;
  } finally {
    w.lock.releaseShared();
  }
}

/** A corruption found while the image is writable sets the corrupt bit: no writer touches it again. */
async function flagCorrupt(s: Qcow2State, e: unknown): Promise<void> {
  if ((e as { code?: string }).code !== 'IMAGE_CORRUPT' || !s.corrupt || s.readOnly || !s.w) return;
  await markCorrupt(s).catch(() => undefined);
}

/** Runs a modifying operation, flagging the image corrupt when it finds corruption. */
async function modifying(s: Qcow2State, fn: () => Promise<void>): Promise<void> {
  try {
    await writable(s);
    await fn();
  } catch (e) {
    await flagCorrupt(s, e);
    throw e;
  }
}

/** Writes everything back and, with lazy refcounts, clears the dirty bit: the image is clean on disk. */
async function settle(s: Qcow2State): Promise<void> {
  if (!s.w || s.readOnly) return;
  // Clusters counted ahead for allocation are given back: a clean image has no leaks.
  await exclusiveQuiet(s);
  try {
    await s.refcounts.releasePool();
  } finally {
    s.w.lock.releaseExclusive();
  }
  await writeBack(s);
  if ((s.header.incompatible & INCOMPAT_DIRTY) !== 0n && !s.corrupt) await setDirtyBit(s, false);
}

export const qcow2Format = defineDriver<Qcow2State>({
  name: 'qcow2',
  role: 'format',
  mutableOptions: ['read-only'],

  // --- open / close
  open: openQcow2,
  async close(s) {
    try {
      if (!s.corrupt) await settle(s);
      // Space handed out ends at hostEnd; the file may have grown ahead of it in steps.
      if (s.w && !s.readOnly && !s.corrupt && s.file.length() > s.refcounts.hostEnd) {
        await s.file.truncate(s.refcounts.hostEnd);
      }
    } finally {
      s.l2Cache.clear();
      s.compressedCache.clear();
    }
  },
  children: (s) => {
    const out = [s.file];
    if (s.backing) out.push(s.backing);
    if (s.externalData) out.push(s.data);
    return out;
  },

  // --- reopen: read-only <-> read-write in place
  async reopenPrepare(s, opts) {
    if (opts.readOnly === undefined || opts.readOnly === s.readOnly) return;
    if (opts.readOnly) {
      await settle(s); // the file child is still writable while parents prepare first
    } else {
      const refused = refuseWriting(s);
      if (refused) throw refused;
    }
  },
  reopenCommit(s, opts) {
    if (opts.readOnly !== undefined) s.readOnly = opts.readOnly;
  },

  // --- I/O
  length: (s) => s.header.size,
  read: readLocked,
  mapHostCached,
  write: (s, offset, buf) => modifying(s, () => writeGuest(s, offset, buf)),
  writeZeroes: (s, offset, length, opts) =>
    modifying(s, () => writeZeroesGuest(s, offset, length, opts.mayUnmap)),
  discard: (s, offset, length) => modifying(s, () => discardGuest(s, offset, length)),
  truncate: (s, size) => modifying(s, () => resizeImage(s, size)),
  async flush(s) {
    if (s.readOnly || !s.w) return;
    await writeBack(s);
  },
  blockStatus,
  allocatedSize: (s) => s.file.allocatedSize(),

  // --- capabilities
  capabilities: (s) => {
    const ok = !s.readOnly && refuseWriting(s) === undefined;
    return { write: ok, truncate: ok, writeZeroes: ok, discard: ok };
  },
  isReadOnly: (s) => s.readOnly,
  describe: (s) => ({ filename: s.file.filename, fileKey: s.file.fileKey }),
  imageInfo: info,
  resolved: (s) => (s.snapshotView ? { snapshot: { id: s.snapshotView.id, name: s.snapshotView.name } } : {}),
  attach: (s, node) => registerQcow2Node(node, s),
});
