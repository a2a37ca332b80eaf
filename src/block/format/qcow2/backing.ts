/**
 * The backing node of a qcow2 image: an explicit node, none, or the image's
 * own backing file. An image's own backing file is followed only with its
 * recorded format (never probed), only inside the allowed roots, only up to
 * MAX_BACKING_DEPTH images, and never back to an image already in the chain.
 */
import { BlkError } from '../../../errors.js';
import type { OpenContext } from '../../driver.js';
import { MAX_BACKING_DEPTH } from '../../limits.js';
import { confinement, resolveImplicitFile } from '../../path-policy.js';
import type { BlockNode } from '../../types.js';
import type { Qcow2Extensions } from './extensions.js';

const BACKING_FORMATS = ['qcow2', 'raw'];

/** Opens (or takes) the backing node for an image whose file is `file`; null when there is none. */
export async function openBacking(
  ctx: OpenContext,
  file: BlockNode,
  ext: Qcow2Extensions,
): Promise<BlockNode | null> {
  const path = file.filename ?? '?';
  if (ctx.backing !== undefined) return ctx.backing;
  if (ext.backingFile === undefined) return null;
  const name = ext.backingFile;
  const format = ext.backingFormat;
  if (format === undefined) {
    throw new BlkError(
      'BACKING_POLICY',
      `backing file '${name}' has no recorded format; backing files are never probed (give the backing node explicitly)`,
      { file: path, field: 'backing_format' },
    );
  }
  if (!BACKING_FORMATS.includes(format)) {
    throw new BlkError('IMAGE_UNSUPPORTED', `backing file format '${format}' is not supported`, {
      file: path,
      field: 'backing_format',
    });
  }
  const depth = ctx.chain.depth + 1;
  if (depth > MAX_BACKING_DEPTH) {
    throw new BlkError('BACKING_CHAIN', `backing chain is longer than ${MAX_BACKING_DEPTH} images`, {
      file: path,
      field: 'backing_file_offset',
    });
  }
  const real = await resolveImplicitFile(ctx.policy, path, name, 'backing file', 'backing_file_offset');
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
      field: 'backing_file_offset',
    });
  }
  return node;
}
