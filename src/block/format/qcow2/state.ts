/** The opened state of a qcow2 node, shared by the files that implement its concerns. */
import { BlkError, Errno } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import type { Qcow2Bitmap } from './bitmaps.js';
import type { Qcow2Extensions } from './extensions.js';
import type { Qcow2Header } from './header.js';
import type { Refcounts } from './refcount.js';
import type { RwLock } from './rwlock.js';
import type { SharedCluster } from './shared.js';
import type { Qcow2Snapshot } from './snapshots.js';
import type { TableCache } from './table-cache.js';

export interface Qcow2State {
  path: string;
  header: Qcow2Header;
  ext: Qcow2Extensions;
  /** The image file. */
  file: BlockNode;
  fileLength: number;
  /** Where guest data lives: the image file, or the external data file. */
  data: BlockNode;
  dataLength: number;
  externalData: boolean;
  backing: BlockNode | null;
  /** The active L1 table (only the entries that map the virtual size), or the viewed snapshot's. */
  l1: Buffer;
  /** The internal snapshot this node is a read-only view of (option `snapshot`). */
  snapshotView: Qcow2Snapshot | undefined;
  l2Cache: TableCache;
  compressedCache: TableCache;
  refcounts: Refcounts;
  snapshots: Qcow2Snapshot[];
  bitmaps: Qcow2Bitmap[];
  /** Fixed metadata areas [start, end) no L2 table may overlap. */
  metadata: [string, number, number][];
  /** Set when a run-time check found corruption: the image is never written. */
  corrupt: boolean;
  /** `check -r` on an image flagged corrupt: writing is allowed to repair it. */
  repairing: boolean;
  /** The node's current read-only state (reopen changes it). */
  readOnly: boolean;
  /** Write-side state, present once the node has been writable. */
  w: WriteState | undefined;
}

/** What writing needs on top of the read state: locks, dirty sets, overlap set. */
export interface WriteState {
  lock: RwLock;
  /** Host clusters holding metadata (overlap protection). */
  meta: Set<number>;
  /** Host clusters referenced more than their refcount (or COPIED) allows: never written (shared.ts). */
  shared: Map<number, SharedCluster>;
  /** L2 tables changed in memory, pinned in the cache until written. */
  dirtyL2: DirtyEntries;
  /** L1 entries changed in memory. */
  dirtyL1: Set<number>;
  /** What the running write-back is writing (taken out of dirtyL2/dirtyL1): not in the file yet either. */
  writingL2: DirtyEntries;
  writingL1: Set<number>;
  /** New L2 tables whose content must be durable before the L1 entry naming them is written (copied, or in a reused cluster). */
  orderedL2: Set<number>;
  /** The L1 table as the header on disk names it; differs after a resize moved it. */
  diskL1: { offset: number; size: number };
  /** The virtual size on disk. */
  diskSize: number;
  /** The write-back running or last run (write-backs run one after the other). */
  running: Promise<void>;
  /** The write-back waiting for the running one: later requests join it (group commit). */
  queued: { full: boolean; promise: Promise<void> } | undefined;
  /** Lazy refcounts: ordering is kept by the dirty bit instead of syncs. */
  lazy: boolean;
  /** Guest clusters an allocating write is filling right now (others touching them wait). */
  inflight: Map<number, Promise<void>>;
  /**
   * Ordering bookkeeping against the page cache: `gen` counts writes to the
   * file; `synced` is the last gen a completed sync covers; `refsAt` is the
   * gen of the last refcount write, `dataAt` of the last data write whose
   * new entries must not reach the disk before it (copy-on-write or fill
   * bytes, or a reused cluster: see writeData), `l2At` of the last write of
   * a table in `orderedL2`, `entriesAt` of the last write of refcount table
   * entries naming new blocks (the counts those blocks hold are reachable only
   * once such entries are durable). A later phase needs a sync first when
   * what it depends on was written after `synced`.
   */
  gen: number;
  synced: number;
  refsAt: number;
  dataAt: number;
  l2At: number;
  entriesAt: number;
  /** The block snapshot (AllocationPool.takeSnapshot) the last refcount block write wrote. */
  refsSnapshot: number;
  /** A sync started without waiting (to make counted-ahead refcounts durable). */
  background: Promise<void> | undefined;
}

/** Changed L2 tables: table offset → the changed entry indexes, or null for the whole table (new or copied). */
export type DirtyEntries = Map<number, Set<number> | null>;

/** L2 tables and refcount blocks are written back in pieces of this size (at most one cluster). */
export const TABLE_PAGE = 4096;

/** An IMAGE_CORRUPT error (answered as Errno.EIO) for a bad table entry found at run time; marks the image corrupt. */
export function corruption(s: Qcow2State, field: string, msg: string): BlkError {
  s.corrupt = true;
  return new BlkError('IMAGE_CORRUPT', msg, { file: s.path, field }, { errno: Errno.EIO });
}
