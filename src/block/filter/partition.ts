/**
 * The `partition` filter driver: partition `number` of its file child's MBR
 * or GPT, as a fixed window over the child. open() reads the table through
 * the child node (the bytes are untrusted; partition/ checks them) and works
 * out offset and size once; after that the I/O is the shared window shift
 * (window.ts), and resolved() tells callers which window it chose.
 */
import { BlkError } from '../../errors.js';
import { defineDriver } from '../driver.js';
import { findPartition, nodeReader } from '../partition/index.js';
import { checkWindow, type WindowState, windowOps } from '../window.js';

interface PartitionState extends WindowState {
  /** The partition number (Linux numbering). */
  number: number;
  scheme: 'mbr' | 'gpt';
}

export const partitionFilter = defineDriver<PartitionState>({
  name: 'partition',
  role: 'filter',
  mutableOptions: ['read-only'],

  async open(ctx) {
    const child = ctx.file;
    if (!child) {
      throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver partition needs a file child`);
    }
    const source = child.filename ?? child.nodeName;
    const number = ctx.options.number;
    if (number === undefined) {
      throw new BlkError('USAGE', `node '${ctx.nodeName}': driver partition needs a partition 'number'`, {
        file: source,
      });
    }
    const p = await findPartition(nodeReader(child), child.length(), number, source);
    // The parser already refuses partitions past the end of the disk; the window must not trust that.
    checkWindow(child, p.offset, p.size, `partition ${number}`);
    return {
      child,
      offset: p.offset,
      size: p.size,
      fixed: true,
      readOnly: ctx.readOnly,
      number,
      scheme: p.scheme,
    };
  },
  ...windowOps,

  /** A partition is a fixed window: resizing it would mean editing the table. */
  async truncate(s) {
    throw new BlkError('NOT_SUPPORTED', `partition ${s.number} is a fixed window and cannot be resized`, {
      file: s.child.filename,
    });
  },
  resolved: (s) => ({ offset: s.offset, size: s.size, scheme: s.scheme }),
});
