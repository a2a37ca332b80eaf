/**
 * The backing node of a qcow2 image: an explicit node, none, or the image's
 * own backing file. An image's own backing file is followed only with its
 * recorded format (never probed), through openNamedBacking (allowed roots,
 * depth bound, no cycles).
 */
import { BlkError } from '../../../errors.js';
import type { OpenContext } from '../../driver.js';
import type { BlockNode } from '../../types.js';
import { openNamedBacking } from '../backing-file.js';
import type { Qcow2Extensions } from './extensions.js';

const BACKING_FORMATS = ['qcow2', 'raw', 'vpc', 'vdi', 'qed', 'vmdk'];

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
  return openNamedBacking(ctx, file, name, format, 'backing_file_offset');
}
