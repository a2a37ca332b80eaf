/**
 * The `raw` format driver: the file child as it is, or a window of it
 * (`offset`/`size`). Every access is bounds-checked by the node wrapper
 * against the window, so nothing outside it is ever reached; the I/O is the
 * shared window shift (window.ts).
 */
import { BlkError } from '../../errors.js';
import { defineDriver } from '../driver.js';
import { checkWindow, type WindowState, windowOps } from '../window.js';

export const rawFormat = defineDriver<WindowState>({
  name: 'raw',
  role: 'format',
  mutableOptions: ['read-only'],

  async open(ctx) {
    const child = ctx.file;
    if (!child) throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver raw needs a file child`);
    const offset = ctx.options.offset ?? 0;
    const size = ctx.options.size ?? child.length() - offset;
    checkWindow(child, offset, size, 'raw');
    const fixed = ctx.options.offset !== undefined || ctx.options.size !== undefined;
    return { child, offset, size, fixed, readOnly: ctx.readOnly };
  },
  ...windowOps,

  /** Follows the child's size, unless the window was given. */
  async truncate(s, size) {
    if (s.fixed) {
      throw new BlkError('NOT_SUPPORTED', 'a raw node with offset/size cannot be resized', {
        file: s.child.filename,
      });
    }
    await s.child.truncate(size);
  },
});
