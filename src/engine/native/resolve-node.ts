/**
 * Turns a manifest node (QAPI spelling, possibly `driver: auto`) into the
 * block layer's node options, probing an `auto` format through the already
 * open file child. The node opens read-only or read-write exactly as the
 * plan's options say.
 */
import type { NodeOptions as BlockNodeOptions } from '../../block/options.js';
import { probeNode } from '../../block/probe.js';
import type { BlockNode } from '../../block/types.js';
import { BlkError } from '../../errors.js';
import type { NodeOptions } from '../../reconcile/model.js';

export interface ResolvedNode {
  options: BlockNodeOptions;
  /** The driver a probe chose (shown in status and observed). */
  driver?: string;
}

/** Resolves `n` against its open children (`lookup` by node-name). */
export async function resolveNode(
  n: NodeOptions,
  lookup: (name: string) => BlockNode | undefined,
): Promise<ResolvedNode> {
  const name = n['node-name'];
  const base = { nodeName: name, readOnly: n['read-only'] };
  const file = (): string => {
    const c = n.file === undefined ? undefined : lookup(n.file);
    if (!c) throw new BlkError('STATE', `node '${name}': file '${n.file}' is not open`);
    return n.file!;
  };
  switch (n.driver) {
    case 'file':
      if (!n.filename) throw new BlkError('IMAGE_INVALID', `node '${name}': file node without filename`);
      return {
        options: {
          driver: 'file',
          ...base,
          filename: n.filename,
          ...(n.locking !== undefined ? { locking: n.locking } : {}),
          ...(n['force-share'] ? { forceShare: true } : {}),
        },
      };
    case 'raw':
      return {
        options: {
          driver: 'raw',
          ...base,
          file: file(),
          ...(n.offset !== undefined ? { offset: n.offset } : {}),
          ...(n.size !== undefined ? { size: n.size } : {}),
        },
      };
    case 'qcow2':
    case 'vmdk':
    case 'vhdx':
      return {
        options: {
          driver: n.driver,
          ...base,
          file: file(),
          ...(n.backing !== undefined ? { backing: n.backing } : {}),
          ...(n.snapshot !== undefined ? { snapshot: n.snapshot } : {}),
        },
      };
    case 'partition':
      return { options: { driver: 'partition', ...base, file: file(), number: n.number! } };
    case 'vpc':
    case 'vdi':
    case 'qed':
      return {
        options: {
          driver: n.driver,
          ...base,
          file: file(),
          ...(n.backing !== undefined && n.driver !== 'vdi' ? { backing: n.backing } : {}),
        },
      };
    case 'auto': {
      const driver = await probeNode(lookup(file())!);
      if (n.snapshot === undefined) return { options: { driver, ...base, file: n.file! }, driver };
      if (driver !== 'qcow2') {
        throw new BlkError(
          'USAGE',
          `node '${name}': snapshot: internal snapshots are a qcow2 feature; the image is ${driver}`,
        );
      }
      return { options: { driver, ...base, file: n.file!, snapshot: n.snapshot }, driver };
    }
    default:
      throw new BlkError(
        'NOT_SUPPORTED',
        `node '${name}': driver '${String(n.driver)}' is not supported by the native engine`,
      );
  }
}
