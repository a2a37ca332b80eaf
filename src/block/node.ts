/**
 * Wraps a driver and its opened state into a BlockNode. The generic checks
 * live here once: range checks, read-only enforcement, and the defaults for
 * callbacks a driver leaves out (nbdkit style).
 */
import { BlkError, Errno } from '../errors.js';
import type { BlockDriver, ReopenOptions } from './driver.js';
import type { BlockCapabilities, BlockExtent, BlockNode, HostExtent } from './types.js';

const ZERO_CHUNK = 1024 * 1024;
let zeroChunk: Buffer | undefined;

/** A BlockNode plus the graph's handles on it (reopen transaction steps). */
export interface GraphNode extends BlockNode {
  reopenPrepare(opts: ReopenOptions): Promise<void>;
  reopenCommit(opts: ReopenOptions): void;
  reopenAbort(opts: ReopenOptions): void;
  readonly driverMutableOptions: readonly string[];
}

/** Wraps an opened driver state into a node handle. */
export function wrapNode<S>(
  driver: BlockDriver<S>,
  state: S,
  meta: { nodeName: string; readOnly: boolean; filename?: string; fileKey?: string },
): GraphNode {
  let closed = false;
  let readOnlyFallback = meta.readOnly;
  const isReadOnly = () => (driver.isReadOnly ? driver.isReadOnly(state) : readOnlyFallback);

  const where = () => ({ file: meta.filename });
  const checkOpen = () => {
    if (closed) throw new BlkError('INTERNAL', `node '${meta.nodeName}' is closed`, where());
  };
  const checkRange = (offset: number, length: number, op: string) => {
    checkOpen();
    const size = driver.length(state);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new BlkError('OUT_OF_RANGE', `${op}: bad range ${offset}+${length}`, where(), {
        errno: Errno.EINVAL,
      });
    }
    if (offset + length > size) {
      throw new BlkError(
        'OUT_OF_RANGE',
        `${op} of ${length} bytes at ${offset} runs past the end of node '${meta.nodeName}' (${size} bytes)`,
        where(),
        { errno: Errno.EINVAL },
      );
    }
  };
  const checkWritable = (op: string) => {
    if (isReadOnly()) {
      throw new BlkError('READ_ONLY', `${op}: node '${meta.nodeName}' is read-only`, where(), {
        errno: Errno.EROFS,
      });
    }
  };
  const unsupported = (op: string) =>
    new BlkError('NOT_SUPPORTED', `${op} is not supported by driver '${driver.name}'`, where(), {
      errno: Errno.EOPNOTSUPP,
    });

  const node: GraphNode = {
    nodeName: meta.nodeName,
    driver: driver.name,
    role: driver.role,
    filename: meta.filename,
    fileKey: meta.fileKey,
    driverMutableOptions: driver.mutableOptions,
    get children() {
      return driver.children ? driver.children(state) : [];
    },
    get readOnly() {
      return isReadOnly();
    },

    length() {
      checkOpen();
      return driver.length(state);
    },
    async read(offset, buf) {
      checkRange(offset, buf.length, 'read');
      if (buf.length === 0) return;
      await driver.read(state, offset, buf);
    },
    async write(offset, buf) {
      checkRange(offset, buf.length, 'write');
      checkWritable('write');
      if (!driver.write) throw unsupported('write');
      if (buf.length === 0) return;
      await driver.write(state, offset, buf);
    },
    async writeZeroes(offset, length, opts) {
      checkRange(offset, length, 'write-zeroes');
      checkWritable('write-zeroes');
      if (length === 0) return;
      if (driver.writeZeroes) return driver.writeZeroes(state, offset, length, opts);
      const write = driver.write;
      if (!write) throw unsupported('write-zeroes');
      zeroChunk ??= Buffer.alloc(ZERO_CHUNK);
      for (let done = 0; done < length; ) {
        const n = Math.min(ZERO_CHUNK, length - done);
        await write(state, offset + done, zeroChunk.subarray(0, n));
        done += n;
      }
    },
    async discard(offset, length) {
      checkRange(offset, length, 'discard');
      checkWritable('discard');
      if (length === 0 || !driver.discard) return; // a hint: doing nothing is correct
      await driver.discard(state, offset, length);
    },
    async flush() {
      checkOpen();
      if (driver.flush) return driver.flush(state);
      for (const c of node.children) await c.flush();
    },
    async truncate(size) {
      checkOpen();
      checkWritable('truncate');
      if (!Number.isSafeInteger(size) || size < 0) {
        throw new BlkError('OUT_OF_RANGE', `truncate: bad size ${size}`, where(), { errno: Errno.EINVAL });
      }
      if (!driver.truncate) throw unsupported('truncate');
      await driver.truncate(state, size);
    },
    async blockStatus(offset, length): Promise<BlockExtent> {
      checkOpen();
      const size = driver.length(state);
      if (!Number.isSafeInteger(offset) || offset < 0 || offset >= size || length <= 0) {
        throw new BlkError('OUT_OF_RANGE', `block-status at ${offset} is outside the node`, where(), {
          errno: Errno.ENXIO, // what SEEK_DATA/SEEK_HOLE answer past the end
        });
      }
      const len = Math.min(length, size - offset);
      if (driver.blockStatus) return driver.blockStatus(state, offset, len);
      return { offset, length: len, data: true, zero: false };
    },
    refreshLength: driver.refreshLength
      ? () => {
          checkOpen();
          driver.refreshLength!(state);
        }
      : undefined,
    mapHostCached: driver.mapHostCached
      ? (offset: number, length: number): HostExtent[] | null => {
          if (closed || offset < 0 || length <= 0 || offset + length > driver.length(state)) return null;
          return driver.mapHostCached!(state, offset, length);
        }
      : undefined,
    async allocatedSize() {
      checkOpen();
      if (driver.allocatedSize) return driver.allocatedSize(state);
      let total = 0;
      for (const c of node.children) total += await c.allocatedSize();
      return total;
    },
    capabilities(): BlockCapabilities {
      const ro = isReadOnly();
      const c = driver.capabilities ? driver.capabilities(state) : {};
      return {
        write: !ro && (c.write ?? driver.write !== undefined),
        truncate: !ro && (c.truncate ?? driver.truncate !== undefined),
        writeZeroes: !ro && (c.writeZeroes ?? (driver.writeZeroes ?? driver.write) !== undefined),
        discard: !ro && (c.discard ?? driver.discard !== undefined),
      };
    },
    imageInfo: driver.imageInfo ? () => driver.imageInfo!(state) : undefined,
    resolved: driver.resolved ? () => driver.resolved!(state) : undefined,
    async reopen(opts) {
      // The node and its file child (recursively) change together; backing files stay read-only.
      await reopenTogether(fileSubtree(node), opts);
    },
    async reopenPrepare(opts) {
      checkOpen();
      for (const key of Object.keys(opts) as (keyof ReopenOptions)[]) {
        if (opts[key] === undefined) continue;
        const qapi = key === 'readOnly' ? 'read-only' : key;
        if (!driver.mutableOptions.includes(qapi)) {
          throw new BlkError(
            'NOT_SUPPORTED',
            `driver '${driver.name}' cannot change '${qapi}' in place`,
            where(),
          );
        }
      }
      if (driver.reopenPrepare) await driver.reopenPrepare(state, opts);
    },
    reopenCommit(opts) {
      if (driver.reopenCommit) driver.reopenCommit(state, opts);
      if (opts.readOnly !== undefined) readOnlyFallback = opts.readOnly;
    },
    reopenAbort(opts) {
      if (driver.reopenAbort) driver.reopenAbort(state, opts);
    },
    async close() {
      if (closed) return;
      closed = true;
      if (driver.close) await driver.close(state);
    },
  };
  driver.attach?.(state, node);
  return node;
}

function isGraphNode(n: BlockNode): n is GraphNode {
  return typeof (n as Partial<GraphNode>).reopenPrepare === 'function';
}

/** The node and, for format/filter nodes, its file child recursively. */
function fileSubtree(n: GraphNode): GraphNode[] {
  const out: GraphNode[] = [n];
  let cur: BlockNode = n;
  while (cur.role !== 'protocol') {
    const next: BlockNode | undefined = cur.children[0];
    if (!next || !isGraphNode(next)) break;
    out.push(next);
    cur = next;
  }
  return out;
}

/** Reopens several nodes as one transaction: prepare all, then commit all, or abort the prepared ones. */
export async function reopenTogether(nodes: readonly GraphNode[], opts: ReopenOptions): Promise<void> {
  // Children first when becoming writable, parents first when becoming read-only.
  const order = opts.readOnly === false ? [...nodes].reverse() : [...nodes];
  const prepared: GraphNode[] = [];
  try {
    for (const n of order) {
      await n.reopenPrepare(opts);
      prepared.push(n);
    }
  } catch (e) {
    for (const n of prepared.reverse()) n.reopenAbort(opts);
    throw e;
  }
  for (const n of order) n.reopenCommit(opts);
}
