/**
 * A window [offset, offset+size) over a child node: the I/O shared by every
 * driver that only shifts offsets (`raw` with offset/size, the `partition`
 * filter), like nbdkit's offset filter. The node wrapper has already checked
 * each range against length(), so the shifted range lies inside the child.
 */
import { BlkError } from '../errors.js';
import type { BlockDriver } from './driver.js';
import type { BlockNode } from './types.js';

/** The state every window driver keeps (drivers may add their own fields). */
export interface WindowState {
  child: BlockNode;
  offset: number;
  size: number;
  /** true when the window was given or worked out: it never follows the child's size. */
  fixed: boolean;
  readOnly: boolean;
}

/** Refuses a window that does not lie inside the child; `what` names the driver in the message ("raw"). */
export function checkWindow(child: BlockNode, offset: number, size: number, what: string): void {
  const childLen = child.length();
  const place = { file: child.filename };
  if (!Number.isSafeInteger(offset) || offset < 0 || offset > childLen) {
    throw new BlkError('OUT_OF_RANGE', `${what} offset ${offset} is outside the file (${childLen} bytes)`, {
      ...place,
      field: 'offset',
    });
  }
  if (!Number.isSafeInteger(size) || size < 0 || offset + size > childLen) {
    throw new BlkError(
      'OUT_OF_RANGE',
      `${what} window ${offset}+${size} runs past the end of the file (${childLen} bytes)`,
      { ...place, field: 'size' },
    );
  }
}

/** The window's callbacks: spread them into a driver object and add open() (and truncate, if any). */
export const windowOps = {
  children: (s) => [s.child],

  // --- I/O: one line each, the window shift
  length: (s) => (s.fixed ? s.size : s.child.length()),
  read: (s, off, buf) => s.child.read(s.offset + off, buf),
  write: (s, off, buf) => s.child.write(s.offset + off, buf),
  writeZeroes: (s, off, len, opts) => s.child.writeZeroes(s.offset + off, len, opts),
  discard: (s, off, len) => s.child.discard(s.offset + off, len),
  flush: (s) => s.child.flush(),
  async blockStatus(s, off, len) {
    const e = await s.child.blockStatus(s.offset + off, len);
    return { ...e, offset: e.offset - s.offset };
  },
  mapHostCached: (s, off, len) => {
    const x = s.child.mapHostCached?.(s.offset + off, len) ?? null;
    // The node wrapper bounds the range by the window, so a writable piece lies inside it.
    return x && s.readOnly ? x.map((e) => ('fd' in e ? { ...e, writable: false } : e)) : x;
  },
  // A given window never follows its child; one that does, re-reads the child's size.
  refreshLength: (s) => {
    if (!s.fixed) s.child.refreshLength?.();
  },
  allocatedSize: (s) => s.child.allocatedSize(),

  // --- capabilities and reopen
  capabilities: (s) => ({ ...s.child.capabilities(), truncate: !s.fixed && s.child.capabilities().truncate }),
  reopenCommit(s, opts) {
    if (opts.readOnly !== undefined) s.readOnly = opts.readOnly;
  },
  isReadOnly: (s) => s.readOnly || s.child.readOnly,
  describe: (s) => ({ filename: s.child.filename, fileKey: s.child.fileKey }),
} satisfies Partial<BlockDriver<WindowState>>;
