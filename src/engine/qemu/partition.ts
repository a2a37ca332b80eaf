/**
 * `partition` nodes in the qemu engine: our own block layer opens the image
 * read-only and its partition filter finds the window in the MBR or GPT;
 * QEMU then gets a raw node with that offset and size.
 */
import { openImage } from '../../block/open-image.js';
import type { PathPolicy } from '../../block/path-policy.js';
import { BlkError } from '../../errors.js';

/** Where a partition's window is looked for: a whole raw or qcow2 image file. */
export interface PartitionSource {
  path: string;
  format: 'raw' | 'qcow2';
  number: number;
  /** The format node's backing choice: null for none, absent to follow the image's own. */
  backing: string | null | undefined;
}

/** Offset and size of the partition, read through our block layer (read-only, nothing written). */
export async function partitionWindow(
  src: PartitionSource,
  policy: PathPolicy | undefined,
): Promise<{ offset: number; size: number }> {
  const roots = policy?.allowedRoots;
  const img = await openImage({
    filename: src.path,
    format: src.format,
    readOnly: true,
    backing: src.backing === null ? 'none' : 'follow',
    ...(roots !== undefined && roots !== 'any' ? { allowedRoots: [...roots] } : {}),
  });
  try {
    const part = await img.graph.openNode({
      driver: 'partition',
      nodeName: `${img.node.nodeName}-part`,
      file: img.node.nodeName,
      number: src.number,
      readOnly: true,
    });
    const w = part.resolved?.();
    if (w?.offset === undefined || w.size === undefined)
      throw new BlkError('INTERNAL', `the partition filter reported no window for '${src.path}'`);
    return { offset: w.offset, size: w.size };
  } finally {
    await img.close();
  }
}
