/** The opened state of a qcow2 node, shared by the files that implement its concerns. */
import { BlkError, Errno } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import type { Qcow2Bitmap } from './bitmaps.js';
import type { Qcow2Extensions } from './extensions.js';
import type { Qcow2Header } from './header.js';
import type { Refcounts } from './refcount.js';
import type { RwLock } from './rwlock.js';
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
  /** The active L1 table (only the entries that map the virtual size). */
  l1: Buffer;
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
  /** L2 tables changed in memory (offsets), pinned in the cache until written. */
  dirtyL2: Set<number>;
  /** L1 entries changed in memory. */
  dirtyL1: Set<number>;
  /** The L1 table as the header on disk names it; differs after a resize moved it. */
  diskL1: { offset: number; size: number };
  /** The virtual size on disk. */
  diskSize: number;
  /** Write-backs run one after the other. */
  chain: Promise<void>;
  /** Lazy refcounts: ordering is kept by the dirty bit instead of syncs. */
  lazy: boolean;
  /** Guest clusters an allocating write is filling right now (others touching them wait). */
  inflight: Map<number, Promise<void>>;
  /** Bytes of dirty tables in memory (a write-back starts above a bound). */
  dirtyBytes: number;
}

/** An IMAGE_CORRUPT error (answered as Errno.EIO) for a bad table entry found at run time; marks the image corrupt. */
export function corruption(s: Qcow2State, field: string, msg: string): BlkError {
  s.corrupt = true;
  return new BlkError('IMAGE_CORRUPT', msg, { file: s.path, field }, { errno: Errno.EIO });
}
