/** The opened state of a qcow2 node, shared by the files that implement its concerns. */
import { BlkError } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import type { Qcow2Bitmap } from './bitmaps.js';
import type { Qcow2Extensions } from './extensions.js';
import type { Qcow2Header } from './header.js';
import type { RefcountReader } from './refcount.js';
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
  refcounts: RefcountReader;
  snapshots: Qcow2Snapshot[];
  bitmaps: Qcow2Bitmap[];
  /** Fixed metadata areas [start, end) no L2 table may overlap. */
  metadata: [string, number, number][];
  /** Set when a run-time check found corruption: the image is never written. */
  corrupt: boolean;
}

const EIO = 5;

/** An IMAGE_CORRUPT error (answered as EIO) for a bad table entry found at run time; marks the image corrupt. */
export function corruption(s: Qcow2State, field: string, msg: string): BlkError {
  s.corrupt = true;
  return new BlkError('IMAGE_CORRUPT', msg, { file: s.path, field }, { errno: EIO });
}
