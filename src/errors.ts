/**
 * The one error type of blkexport. Every failure a user can see carries a code
 * (a string union, never an enum) and, where it has one, a place: a manifest
 * position (file:line:col) or an image path and field.
 */

export type BlkErrorCode =
  // manifests
  | 'MANIFEST_SYNTAX'
  | 'MANIFEST_SCHEMA'
  | 'MANIFEST_SEMANTIC'
  | 'MANIFEST_COLLISION'
  // images and the block layer
  | 'IMAGE_INVALID'
  | 'IMAGE_UNSUPPORTED'
  | 'IMAGE_CORRUPT'
  | 'IMAGE_ENCRYPTED'
  | 'IMAGE_TOO_LARGE'
  | 'OUT_OF_RANGE'
  | 'READ_ONLY'
  | 'NOT_SUPPORTED'
  | 'BACKING_POLICY'
  | 'BACKING_CHAIN'
  | 'IO'
  // the live state does not allow a step now (a node already open, a child not open): retried
  | 'STATE'
  // exports and mounts
  | 'EXPORT_EXISTS'
  | 'EXPORT_INVALID'
  | 'MOUNT_FAILED'
  | 'PATH_POLICY'
  | 'LOCKED'
  // an answer to a client with a POSIX errno (EACCES for a write to a read-only export)
  | 'ERRNO'
  // command line and agent
  | 'USAGE'
  | 'AGENT'
  | 'INTERNAL';

/** The Linux errno values blkexport answers with or reads (positive; FUSE replies negate them). The one table. */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  ENXIO: 6,
  EBADF: 9,
  EACCES: 13,
  EBUSY: 16,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ENOSYS: 38,
  ELOOP: 40,
  EOPNOTSUPP: 95,
  ENOTCONN: 107,
} as const;

/** Where an error happened: a manifest position or an image (with the field that was wrong). */
export interface BlkErrorPlace {
  file?: string;
  line?: number;
  col?: number;
  /** JSON pointer inside a manifest document, e.g. /spec/exports/0/id */
  path?: string;
  /** Image header or table field, e.g. "l1_table_offset" */
  field?: string;
}

export class BlkError extends Error {
  readonly code: BlkErrorCode;
  readonly place: BlkErrorPlace;
  /** errno to answer a FUSE request with when this error reaches the export (default EIO) */
  readonly errno: number | undefined;

  constructor(
    code: BlkErrorCode,
    message: string,
    place: BlkErrorPlace = {},
    opts: { cause?: unknown; errno?: number } = {},
  ) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'BlkError';
    this.code = code;
    this.place = place;
    this.errno = opts.errno;
  }

  /** `FILE:LINE:COL: message (at /json/path)`, or `FILE: message` for images. */
  format(): string {
    const { file, line, col, path, field } = this.place;
    let where = '';
    if (file !== undefined) {
      where = file;
      if (line !== undefined) where += `:${line}${col !== undefined ? `:${col}` : ''}`;
      where += ': ';
    }
    let msg = `${where}${this.message}`;
    if (path !== undefined && path !== '') msg += ` (at ${path})`;
    if (field !== undefined) msg += ` (field ${field})`;
    return msg;
  }
}

/** True when `e` is a BlkError (also across module copies). */
export function isBlkError(e: unknown): e is BlkError {
  return e instanceof BlkError || (e instanceof Error && e.name === 'BlkError' && 'code' in e);
}

/** A one-line message for any thrown value, never a stack trace. */
export function describeError(e: unknown): string {
  if (isBlkError(e)) return e.format();
  if (e instanceof Error) return e.message;
  return String(e);
}

/**
 * Codes of failures that retrying cannot fix until something changes (the
 * image, the manifest, a path): a corrupt or unsupported image, a path outside
 * the roots, an export the options make impossible.
 */
const TERMINAL_CODES: ReadonlySet<BlkErrorCode> = new Set([
  'IMAGE_INVALID',
  'IMAGE_UNSUPPORTED',
  'IMAGE_CORRUPT',
  'IMAGE_ENCRYPTED',
  'IMAGE_TOO_LARGE',
  'OUT_OF_RANGE',
  'NOT_SUPPORTED',
  'BACKING_POLICY',
  'BACKING_CHAIN',
  'EXPORT_INVALID',
  'PATH_POLICY',
]);

/** True when retrying `e` is pointless until its inputs change (see TERMINAL_CODES). */
export function isTerminal(e: unknown): boolean {
  return isBlkError(e) && TERMINAL_CODES.has(e.code);
}
