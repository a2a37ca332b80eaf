/**
 * The `raw` format driver: the file child as it is, or a window of it
 * (`offset`/`size`, e.g. one partition). Every access is bounds-checked by the
 * node wrapper against the window, so nothing outside it is ever reached.
 */
import { BlkError } from '../../errors.js';
import { defineDriver } from '../driver.js';
import type { BlockNode } from '../types.js';

interface RawState {
  child: BlockNode;
  offset: number;
  size: number;
  /** true when offset/size were given: the window never follows the child's size. */
  fixed: boolean;
  readOnly: boolean;
}

export const rawFormat = defineDriver<RawState>({
  name: 'raw',
  role: 'format',
  mutableOptions: ['read-only'],

  async open(ctx) {
    const child = ctx.file;
    if (!child) throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver raw needs a file child`);
    const childLen = child.length();
    const offset = ctx.options.offset ?? 0;
    const place = { file: child.filename };
    if (!Number.isSafeInteger(offset) || offset < 0 || offset > childLen) {
      throw new BlkError('OUT_OF_RANGE', `raw offset ${offset} is outside the file (${childLen} bytes)`, {
        ...place,
        field: 'offset',
      });
    }
    const size = ctx.options.size ?? childLen - offset;
    if (!Number.isSafeInteger(size) || size < 0 || offset + size > childLen) {
      throw new BlkError(
        'OUT_OF_RANGE',
        `raw window ${offset}+${size} runs past the end of the file (${childLen} bytes)`,
        { ...place, field: 'size' },
      );
    }
    const fixed = ctx.options.offset !== undefined || ctx.options.size !== undefined;
    return { child, offset, size, fixed, readOnly: ctx.readOnly };
  },
  children: (s) => [s.child],

  // --- I/O: one line each, the window shift
  length: (s) => (s.fixed ? s.size : s.child.length()),
  mapHostCached: (s, offset, length) => s.child.mapHostCached?.(s.offset + offset, length) ?? null,
  read: (s, off, buf) => s.child.read(s.offset + off, buf),
  write: (s, off, buf) => s.child.write(s.offset + off, buf),
  writeZeroes: (s, off, len, opts) => s.child.writeZeroes(s.offset + off, len, opts),
  discard: (s, off, len) => s.child.discard(s.offset + off, len),
  flush: (s) => s.child.flush(),
  async blockStatus(s, off, len) {
    const e = await s.child.blockStatus(s.offset + off, len);
    return { ...e, offset: e.offset - s.offset };
  },
  async truncate(s, size) {
    if (s.fixed) {
      throw new BlkError('NOT_SUPPORTED', 'a raw node with offset/size cannot be resized', {
        file: s.child.filename,
      });
    }
    await s.child.truncate(size);
  },
  allocatedSize: (s) => s.child.allocatedSize(),
  capabilities: (s) => ({ ...s.child.capabilities(), truncate: !s.fixed && s.child.capabilities().truncate }),
  reopenCommit(s, opts) {
    if (opts.readOnly !== undefined) s.readOnly = opts.readOnly;
  },
  isReadOnly: (s) => s.readOnly || s.child.readOnly,
  describe: (s) => ({ filename: s.child.filename, fileKey: s.child.fileKey }),
});
