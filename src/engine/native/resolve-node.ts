/**
 * Turns a manifest node (QAPI spelling, possibly with `driver: auto` or a
 * `partition:` still to resolve) into the block layer's node options, using
 * the already-open children to probe a format or read a partition table.
 */

import type { NodeOptions as BlockNodeOptions } from '../../block/options.js';
import { findPartition } from '../../block/partition.js';
import { probeNode } from '../../block/probe.js';
import type { BlockNode } from '../../block/types.js';
import { BlkError } from '../../errors.js';
import type { NodeOptions } from '../../reconcile/model.js';

export interface ResolvedNode {
  options: BlockNodeOptions;
  /** What was resolved at apply time (shown in status and observed). */
  resolved: { driver?: string; offset?: number; size?: number };
}

/** Resolves `n` against its open children (`lookup` by node-name); nodes open read-only until a writable export needs them. */
export async function resolveNode(
  n: NodeOptions,
  lookup: (name: string) => BlockNode | undefined,
): Promise<ResolvedNode> {
  const name = n['node-name'];
  const child = (ref: string | undefined, what: string): BlockNode => {
    const c = ref === undefined ? undefined : lookup(ref);
    if (!c) throw new BlkError('IMAGE_INVALID', `node '${name}': ${what} '${ref}' is not open`);
    return c;
  };
  const resolved: ResolvedNode['resolved'] = {};
  switch (n.driver) {
    case 'file':
      if (!n.filename) throw new BlkError('IMAGE_INVALID', `node '${name}': file node without filename`);
      return {
        options: {
          driver: 'file',
          nodeName: name,
          filename: n.filename,
          readOnly: true,
          ...(n.locking !== undefined ? { locking: n.locking } : {}),
        },
        resolved,
      };
    case 'raw': {
      const file = child(n.file, 'file');
      let offset = n.offset;
      let size = n.size;
      if (n.partition !== undefined) {
        const read = async (off: number, len: number) => {
          const buf = Buffer.alloc(len);
          await file.read(off, buf);
          return buf;
        };
        const p = await findPartition(read, file.length(), n.partition, file.filename ?? file.nodeName);
        offset = p.offset;
        size = p.size;
        resolved.offset = offset;
        resolved.size = size;
      }
      const options: BlockNodeOptions = { driver: 'raw', nodeName: name, file: n.file!, readOnly: true };
      if (offset !== undefined) options.offset = offset;
      if (size !== undefined) options.size = size;
      return { options, resolved };
    }
    case 'qcow2': {
      child(n.file, 'file');
      const options: BlockNodeOptions = { driver: 'qcow2', nodeName: name, file: n.file!, readOnly: true };
      if (n.backing !== undefined) options.backing = n.backing;
      return { options, resolved };
    }
    case 'auto': {
      const file = child(n.file, 'file');
      const driver = await probeNode(file);
      resolved.driver = driver;
      return { options: { driver, nodeName: name, file: n.file!, readOnly: true }, resolved };
    }
    default:
      throw new BlkError(
        'NOT_SUPPORTED',
        `node '${name}': driver '${String(n.driver)}' is not supported by the native engine`,
      );
  }
}
