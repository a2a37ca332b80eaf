/**
 * What the rest of blkexport sees of the block layer: an opened node of the
 * graph. Exports and engines talk to a BlockNode and never to a driver.
 * Offsets and lengths are byte counts (JS numbers: exact up to 2^53).
 */

export type BlockRole = 'protocol' | 'format' | 'filter';

/** One extent answered by blockStatus. */
export interface BlockExtent {
  offset: number;
  length: number;
  /** The range holds data in this node or one of its backing files (false: reads as zeroes because nothing is there). */
  data: boolean;
  /** The range is known to read as zeroes. */
  zero: boolean;
  /**
   * Which layer of the backing chain answers for the range: 1 this node's
   * image, 2 its backing file, and so on; 0 none (unallocated everywhere).
   * Absent: 1 where `data`, else 0 (a node without layers).
   */
  depth?: number;
}

/**
 * How a compressed cluster's bytes are encoded: qcow2's raw deflate (`zlib`)
 * or zstd; a vmdk grain's zlib format (RFC 1950: header, Adler-32) straight
 * away (`zlib-wrapped`) or after a 12-byte grain marker whose u32 at byte 8
 * is the length of the data (`vmdk-marker`).
 */
export type CompressionAlgorithm = 'zlib' | 'zstd' | 'zlib-wrapped' | 'vmdk-marker';

/**
 * One compressed cluster on the host: its compressed bytes at `host` in `fd`
 * (at most `clen` of them: the descriptor's bound, clipped to the file), which
 * must decompress to exactly `clusterSize` bytes; `skip` is the offset in the
 * decompressed cluster of the extent's first byte.
 */
export interface CompressedHost {
  fd: number;
  host: number;
  clen: number;
  clusterSize: number;
  skip: number;
  algorithm: CompressionAlgorithm;
}

/**
 * Where guest bytes live on the host, as far as caches already know it: a
 * range of a host fd, zeroes, or part of one compressed cluster. For the FUSE
 * fast path, which reads mapped ranges itself (and inflates compressed ones).
 * `writable`: a write of any part of the range may be done as a pwrite to fd
 * at host, with no metadata change and nothing else to wait for (a raw file
 * opened read-write; a qcow2 data cluster with COPIED set whose entries are
 * already in the file). Absent means no; compressed pieces never are.
 */
export type HostExtent =
  | { length: number; fd: number; host: number; writable?: boolean }
  | { length: number; zero: true }
  | { length: number; compressed: CompressedHost };

/** Capabilities are asked once and cached by callers (nbdkit's can_write, can_zero, ...). */
export interface BlockCapabilities {
  write: boolean;
  truncate: boolean;
  writeZeroes: boolean;
  discard: boolean;
}

/** One internal snapshot, as `info` shows it. */
export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  icount: number | undefined;
}

/** What a format node knows about its image (for `blkexport info`). */
export interface ImageInfo {
  format: string;
  virtualSize: number;
  clusterSize?: number;
  dirty?: boolean;
  /** The backing file name as recorded in the image. */
  backingFilename?: string;
  backingFormat?: string;
  snapshots?: SnapshotInfo[];
  formatSpecific?: { type: string; data: Record<string, unknown> };
}

/** Options a driver worked out when it opened (not given by the caller), e.g. a partition's window. */
export interface ResolvedOptions {
  offset?: number;
  size?: number;
  /** The partition table the window came from. */
  scheme?: 'mbr' | 'gpt';
  /** qcow2: the internal snapshot a snapshot view shows. */
  snapshot?: { id: string; name: string };
}

export interface BlockNode {
  /** The node-name (manifest, or generated for implicit nodes such as an image's own backing file). */
  readonly nodeName: string;
  readonly driver: string;
  readonly role: BlockRole;
  /** Children: file first, then backing (when present). */
  readonly children: readonly BlockNode[];
  /** Current read-only state (changes only through reopen). */
  readonly readOnly: boolean;
  /** The host file behind this node (a protocol node's own file, a format node's file child's). */
  readonly filename?: string;
  /** `dev:ino` of that host file, used to detect backing-chain cycles. */
  readonly fileKey?: string;

  /** Virtual size in bytes. */
  length(): number;
  /** Fill `buf` with the bytes at [offset, offset+buf.length); the range must lie inside length(). */
  read(offset: number, buf: Buffer): Promise<void>;
  /** Write all of `buf` at offset; the range must lie inside length() (grow with truncate first). */
  write(offset: number, buf: Buffer): Promise<void>;
  /** Make [offset, offset+length) read as zeroes; mayUnmap allows deallocating. */
  writeZeroes(offset: number, length: number, opts: { mayUnmap: boolean }): Promise<void>;
  /** Hint that the range is no longer needed; contents afterwards are unspecified but stable. */
  discard(offset: number, length: number): Promise<void>;
  /** Make every completed write durable (this node and all children). */
  flush(): Promise<void>;
  /** Change the virtual size. */
  truncate(size: number): Promise<void>;
  /** Allocation status of the extent starting at offset (at most `length` bytes long). */
  blockStatus(offset: number, length: number): Promise<BlockExtent>;
  /** Bytes the node occupies on the host (for st_blocks). */
  allocatedSize(): Promise<number>;
  capabilities(): BlockCapabilities;
  /**
   * Host extents for [offset, offset+length), from caches only (no I/O, so
   * the fds are the ones open right now); null when not known or not mappable.
   * A `writable` extent stays writable in place until the range is changed
   * through this node (write-zeroes, discard, truncate, a reopen): callers
   * that let others write it directly stop them before such a change.
   */
  mapHostCached?(offset: number, length: number): HostExtent[] | null;
  /**
   * Re-reads the size from the host file, for when the kernel changed it
   * behind the node (FUSE passthrough writes past the end of a growable
   * export). Synchronous (fstat), like allocatedSize, so a getattr never
   * waits for a pool thread. Absent: the size only changes through the node.
   */
  refreshLength?(): void;
  /** Format details (format nodes that have them, e.g. qcow2). */
  imageInfo?(): ImageInfo;
  /** Options the driver worked out when it opened (drivers that work some out, e.g. `partition`). */
  resolved?(): ResolvedOptions;
  /** Change mutable options in place (prepare, then commit on every node, or abort). */
  reopen(opts: { readOnly?: boolean }): Promise<void>;
  /** Flush (when writable) and release every resource; children are closed by the graph. */
  close(): Promise<void>;
}
