/**
 * Opens the backing file an image names (qcow2, qed, a differencing vhd):
 * only with a known format (never probed), only inside the allowed roots,
 * only up to MAX_BACKING_DEPTH images, and never back to an image already
 * in the chain. The caller has checked that the format is one it accepts.
 */
import { BlkError } from '../../errors.js';
import type { OpenContext } from '../driver.js';
import { MAX_BACKING_DEPTH } from '../limits.js';
import { confinement, resolveImplicitFile } from '../path-policy.js';
import type { BlockNode } from '../types.js';

/** Opens `name` (as found in the image behind `file`, at header field `field`) as a `format` node. */
export async function openNamedBacking(
  ctx: OpenContext,
  file: BlockNode,
  name: string,
  format: string,
  field: string,
): Promise<BlockNode> {
  const path = file.filename ?? '?';
  const depth = ctx.chain.depth + 1;
  if (depth > MAX_BACKING_DEPTH) {
    throw new BlkError('BACKING_CHAIN', `backing chain is longer than ${MAX_BACKING_DEPTH} images`, {
      file: path,
      field,
    });
  }
  const real = await resolveImplicitFile(ctx.policy, path, name, 'backing file', field);
  const seen = new Set(ctx.chain.seen);
  if (file.fileKey !== undefined) seen.add(file.fileKey);
  const node = await ctx.openChild(
    {
      driver: format,
      readOnly: true,
      file: { driver: 'file', filename: real, readOnly: true, ...confinement(ctx.policy) },
    },
    { depth, seen },
  );
  if (node.fileKey !== undefined && seen.has(node.fileKey)) {
    throw new BlkError('BACKING_CHAIN', `backing file '${name}' is an image already in the chain (a cycle)`, {
      file: path,
      field,
    });
  }
  return node;
}

/** Throws BACKING_CHAIN when the image behind `file` is already in the chain above it. */
export function refuseLoop(ctx: OpenContext, file: BlockNode, path: string, field: string): void {
  if (file.fileKey !== undefined && ctx.chain.seen.has(file.fileKey)) {
    throw new BlkError('BACKING_CHAIN', 'backing chain loops back to an image already in the chain', {
      file: path,
      field,
    });
  }
}
