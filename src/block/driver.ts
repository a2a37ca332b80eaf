/**
 * The block driver contract. A driver is one plain object whose members are
 * grouped by contract (open/close, reopen, I/O, capabilities), like QEMU's
 * BlockDriver; optional members are simply absent and the node wrapper
 * (node.ts) supplies the default, like nbdkit. Protocol, format and filter are
 * roles, not class hierarchies.
 */

import type { NodeOptions } from './options.js';
import type { PathPolicy } from './path-policy.js';
import type {
  BlockCapabilities,
  BlockExtent,
  BlockNode,
  BlockRole,
  HostExtent,
  ImageInfo,
  ResolvedOptions,
} from './types.js';

/** Options a reopen may change; a driver lists the ones it supports in `mutableOptions`. */
export interface ReopenOptions {
  readOnly?: boolean;
}

/** What a driver's open() receives: its options, its opened file child, and a way to open implicit children. */
export interface OpenContext {
  readonly nodeName: string;
  readonly readOnly: boolean;
  readonly options: NodeOptions;
  /** The opened `file` child (format and filter drivers). */
  readonly file: BlockNode | undefined;
  /**
   * The explicit backing choice: a node, `null` for none, or undefined to
   * follow what the image names (subject to the path policy).
   */
  readonly backing: BlockNode | null | undefined;
  /** Where implicit files (backing files, external data files) may live. */
  readonly policy: PathPolicy;
  /** Backing chain bookkeeping: depth so far and the (dev:ino) keys of every image above. */
  readonly chain: { depth: number; seen: ReadonlySet<string> };
  /**
   * Opens an implicit child (an image's own backing file or data file)
   * through the graph, so that it is closed after this node.
   */
  openChild(opts: NodeOptions, chain: { depth: number; seen: ReadonlySet<string> }): Promise<BlockNode>;
}

export interface BlockDriver<S = unknown> {
  readonly name: string;
  readonly role: BlockRole;
  /** Options reopen() can change in place; any other change means "replace the node". */
  readonly mutableOptions: readonly string[];

  // --- open / close -------------------------------------------------------
  /** Opens the driver state; children are already open. */
  open(ctx: OpenContext): Promise<S>;
  /** Releases the driver state (flushing first when writable). Children are closed by the graph. */
  close?(s: S): Promise<void>;
  /** Children of this node: file first, then backing, then any others (data file). */
  children?(s: S): BlockNode[];

  // --- reopen (prepare on every node, then commit on all, or abort on all) --
  reopenPrepare?(s: S, opts: ReopenOptions): Promise<void>;
  reopenCommit?(s: S, opts: ReopenOptions): void;
  reopenAbort?(s: S, opts: ReopenOptions): void;

  // --- I/O (ranges are already bounds-checked by the node wrapper) ---------
  length(s: S): number;
  read(s: S, offset: number, buf: Buffer): Promise<void>;
  write?(s: S, offset: number, buf: Buffer): Promise<void>;
  writeZeroes?(s: S, offset: number, length: number, opts: { mayUnmap: boolean }): Promise<void>;
  discard?(s: S, offset: number, length: number): Promise<void>;
  flush?(s: S): Promise<void>;
  truncate?(s: S, size: number): Promise<void>;
  blockStatus?(s: S, offset: number, length: number): Promise<BlockExtent>;
  /** Host extents from caches only (see BlockNode.mapHostCached); ranges are bounds-checked. */
  mapHostCached?(s: S, offset: number, length: number): HostExtent[] | null;
  /** Re-reads a size someone else may have changed (see BlockNode.refreshLength). */
  refreshLength?(s: S): void;
  allocatedSize?(s: S): Promise<number>;

  // --- capabilities (asked once by callers) -------------------------------
  capabilities?(s: S): Partial<BlockCapabilities>;
  /** Format details for `info`. */
  imageInfo?(s: S): ImageInfo;
  /** Options the driver worked out when it opened, e.g. a partition's window. */
  resolved?(s: S): ResolvedOptions;
  /** The host file behind the node (protocol drivers; format nodes inherit their file child's). */
  describe?(s: S): { filename?: string; fileKey?: string };
  /** Called once the state is wrapped into its node (lets a driver offer tools a view keyed by node). */
  attach?(s: S, node: BlockNode): void;
  /** The read-only state of the driver (after reopen commits). */
  isReadOnly?(s: S): boolean;
}

/** Erases a driver's state type so drivers of different states can live in one registry. */
export function defineDriver<S>(d: BlockDriver<S>): BlockDriver<unknown> {
  return d as unknown as BlockDriver<unknown>;
}
