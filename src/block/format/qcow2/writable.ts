/**
 * Turning an open qcow2 node writable: refuse images that must not be
 * written (corrupt bit, external data file), load the whole active L1 table,
 * collect the metadata clusters for overlap protection, hook the allocator
 * to the file, and repair a dirty lazy-refcount image before the first write.
 */

import { BlkError, Errno } from '../../../errors.js';
import {
  AUTOCLEAR_BITMAPS,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  roundUp,
} from './header.js';
import { setDirtyBit, writeAutoclear } from './header-write.js';
import { rebuildRefcounts } from './rebuild.js';
import { RwLock } from './rwlock.js';
import { isShared, scanShared } from './shared.js';
import { snapshotViewReadOnly } from './snapshot-view.js';
import type { Qcow2State, WriteState } from './state.js';

const TWO32 = 2 ** 32;
/** The file grows in steps of at least this much (one ftruncate per step, not per cluster). */
const GROW_STEP = 8 * 1024 * 1024;
/** Autoclear bits this writer keeps valid: bitmaps (marked in use) and raw external data. */
const AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | (1n << 1n);

function entryOffset(buf: Buffer, at: number): number {
  return (buf.readUInt32BE(at) & 0x00ffffff) * TWO32 + ((buf.readUInt32BE(at + 4) & 0xfffffe00) >>> 0);
}

async function readAt(s: Qcow2State, off: number, len: number): Promise<Buffer> {
  const b = Buffer.allocUnsafe(len);
  await s.file.read(off, b);
  return b;
}

/** Adds the clusters [off, off+len) to the set. */
function addRange(meta: Set<number>, cs: number, off: number, len: number): void {
  if (len <= 0) return;
  for (let c = Math.floor(off / cs); c * cs < off + len; c++) meta.add(c);
}

/**
 * Persistent bitmaps are not updated by this writer, so before the first
 * write each one is flagged in use (QEMU's own mark for "may be
 * inconsistent"): no consumer trusts a stale bitmap, and its clusters stay
 * referenced (no leaks).
 */
async function markBitmapsInUse(s: Qcow2State): Promise<void> {
  const b = s.ext.bitmaps!;
  const dir = await readAt(s, b.directoryOffset, b.directorySize);
  let at = 0;
  let changed = false;
  for (let i = 0; i < b.count && at + 24 <= dir.length; i++) {
    const flags = dir.readUInt32BE(at + 12);
    if ((flags & 1) === 0) {
      dir.writeUInt32BE((flags | 1) >>> 0, at + 12);
      changed = true;
    }
    at = Math.ceil((at + 24 + dir.readUInt32BE(at + 20) + dir.readUInt16BE(at + 18)) / 8) * 8;
  }
  if (!changed) return;
  await s.file.write(b.directoryOffset, dir);
  await s.file.flush();
  for (const bm of s.bitmaps) if (!bm.flags.includes('in-use')) bm.flags.unshift('in-use');
}

/** Why this image cannot be written, or undefined. */
export function refuseWriting(s: Qcow2State): BlkError | undefined {
  if (s.snapshotView) return snapshotViewReadOnly(s.path, s.snapshotView);
  if (((s.header.incompatible & INCOMPAT_CORRUPT) !== 0n || s.corrupt) && !s.repairing) {
    return new BlkError(
      'IMAGE_CORRUPT',
      'the image is marked corrupt: it is never written again (repair it with `qemu-img check -r all`)',
      { file: s.path, field: 'incompatible_features' },
      { errno: Errno.EROFS },
    );
  }
  if (s.externalData) {
    return new BlkError(
      'NOT_SUPPORTED',
      'writing qcow2 images with an external data file is not supported yet',
      { file: s.path, field: 'data_file' },
      { errno: Errno.EROFS },
    );
  }
  return undefined;
}

/** Prepares the write state (once); the file child must already be writable. */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
export async function prepareWritable(s: Qcow2State): Promise<WriteState> {
  if (s.w) return s.w;
  const refused = refuseWriting(s);
  if (refused) throw refused;
  const h = s.header;
  const cs = h.clusterSize;
  if (s.l1.length < h.l1Size * 8) s.l1 = await readAt(s, h.l1TableOffset, h.l1Size * 8);

  const meta = new Set<number>([0]);
  addRange(meta, cs, h.l1TableOffset, h.l1Size * 8);
  const refs = s.refcounts;
  addRange(meta, cs, refs.tableOffset, refs.tableClusters * cs);
  for (let ti = 0; ti < refs.entries; ti++) {
    const off = refs.blockOffset(ti);
    if (off !== 0) meta.add(off / cs);
  }
  for (let i = 0; i < h.l1Size; i++) {
    const off = entryOffset(s.l1, i * 8);
    if (off !== 0) meta.add(Math.floor(off / cs));
  }
  if (s.snapshots.length > 0) {
    let tableEnd = h.snapshotsOffset;
    for (const [name, start, end] of s.metadata)
      if (name === 'snapshot table' && start === tableEnd) tableEnd = end;
    addRange(meta, cs, h.snapshotsOffset, tableEnd - h.snapshotsOffset);
    for (const sn of s.snapshots) {
      addRange(meta, cs, sn.l1TableOffset, sn.l1Size * 8);
      const l1 = await readAt(s, sn.l1TableOffset, sn.l1Size * 8);
      for (let i = 0; i < sn.l1Size; i++) {
        const off = entryOffset(l1, i * 8);
        if (off !== 0) meta.add(Math.floor(off / cs));
      }
    }
  }
  if (s.ext.bitmaps) addRange(meta, cs, s.ext.bitmaps.directoryOffset, s.ext.bitmaps.directorySize);

  // Metadata is referenced once per L1 table at most (L2 tables shared with snapshots), so its
  // refcount lies in 1..snapshots+1; anything else (a misread refcount width, a broken block)
  // means allocation would hand out clusters still in use. Such an image is never written.
  if ((h.incompatible & INCOMPAT_DIRTY) === 0n && !s.repairing) {
    const most = s.snapshots.length + 1;
    for (const c of meta) {
      const rc = await refs.getCluster(c);
      if (rc < 1 || rc > most) {
        throw new BlkError(
          'IMAGE_CORRUPT',
          `metadata cluster ${c} has refcount ${rc}: the refcounts cannot be trusted, the image is not written (repair it with \`blkexport check -r all\`)`,
          { file: s.path, field: 'refcount_table' },
          { errno: Errno.EROFS },
        );
      }
    }
  }

  const w: WriteState = {
    lock: new RwLock(),
    meta,
    shared: new Map(),
    dirtyL2: new Map(),
    dirtyL1: new Set(),
    writingL2: new Map(),
    writingL1: new Set(),
    orderedL2: new Set(),
    diskL1: { offset: h.l1TableOffset, size: h.l1Size },
    diskSize: h.size,
    running: Promise.resolve(),
    queued: undefined,
    lazy: (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n,
    inflight: new Map(),
    gen: 0,
    synced: 0,
    refsAt: 0,
    dataAt: 0,
    l2At: 0,
    entriesAt: 0,
    refsSnapshot: 0,
    background: undefined,
  };
  // With lazy refcounts the dirty bit stands in for ordering refcounts before references.
  refs.pool.ordered = !w.lazy;
  refs.hooks = {
    grow: async (end) => {
      if (end <= s.file.length()) return;
      await s.file.truncate(roundUp(end, Math.max(GROW_STEP, cs)));
      s.fileLength = s.file.length();
      s.dataLength = s.fileLength;
      refs.setFileLength(s.fileLength);
    },
    metadata: (c) => meta.add(c),
    isMetadata: (c) => meta.has(c),
    inUse: (c) => isShared(s, c),
  };
  s.w = w;
  await refs.coverCountedBeyondEnd();

  // Autoclear bits we do not understand are cleared: whatever they guarded is no longer kept valid.
  if (h.version === 3 && (h.autoclear & ~AUTOCLEAR_KNOWN) !== 0n) {
    await writeAutoclear(s, h.autoclear & AUTOCLEAR_KNOWN);
  }
  if ((h.autoclear & AUTOCLEAR_BITMAPS) !== 0n && s.ext.bitmaps) await markBitmapsInUse(s);
  if ((h.incompatible & INCOMPAT_DIRTY) !== 0n) {
    // A dirty image's refcounts cannot be trusted: rebuild them before allocating anything.
    await rebuildRefcounts(s);
    await setDirtyBit(s, false);
  }
  // References against refcounts: host clusters used more often than they may be are never written.
  if (!s.repairing) w.shared = await scanShared(s);
  return w;
}
