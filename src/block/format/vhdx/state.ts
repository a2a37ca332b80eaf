/** The state of an opened vhdx node. */
import type { BlockNode } from '../../types.js';
import type { Geometry } from './bat.js';
import type { VhdxHeader } from './header.js';
import type { VhdxMetadata } from './metadata.js';
import type { RegionTable } from './region.js';
import type { FileView } from './view.js';

export interface VhdxState {
  path: string;
  file: BlockNode;
  /** The file as read after log replay. */
  view: FileView;
  header: VhdxHeader;
  regions: RegionTable;
  meta: VhdxMetadata;
  geo: Geometry;
  /** The BAT entries, little-endian 64-bit, as in the file (after log replay). */
  bat: Buffer;
  /** The parent of a differencing image (null: none, or not followed). */
  parent: BlockNode | null;
  /** The parent path as the locator names it (differencing images). */
  parentName: string | undefined;
  /** Log entries replayed into memory at open (0: the log was empty). */
  logEntriesReplayed: number;
}
