/**
 * Throwaway qcow2 overlays over an open node (`overlay: ephemeral`): the
 * overlay file records no backing file name at all; its backing is always
 * given explicitly as the already open node, so nothing ever follows a name
 * from the overlay to another file. Writes land in the overlay (allocating
 * clusters, copying the rest of a cluster up from the backing node), reads of
 * what was never written come from the backing node, which stays read-only.
 */
import { open as openFile, unlink } from 'node:fs/promises';
import { BlkError } from '../errors.js';
import { createQcow2Image } from './format/qcow2/create.js';
import type { BlockGraph } from './graph.js';
import type { BlockNode } from './types.js';

/** qcow2 virtual sizes are whole sectors. */
const SECTOR = 512;

/** Why `base` cannot carry an overlay, or undefined. */
function unfit(base: BlockNode): string | undefined {
  const size = base.length();
  if (size % SECTOR !== 0)
    return `its size (${size} bytes) is not a multiple of ${SECTOR} bytes, and a qcow2 overlay's size is`;
  return undefined;
}

/**
 * Creates an empty qcow2 file at `path` (never overwriting: the name must be
 * new), of `base`'s size, with no backing name recorded. Mode 0600: the
 * overlay holds what the guest wrote.
 */
export async function createOverlayFile(path: string, base: BlockNode): Promise<void> {
  const why = unfit(base);
  if (why !== undefined)
    throw new BlkError('NOT_SUPPORTED', `node '${base.nodeName}' cannot carry an overlay: ${why}`);
  const fh = await openFile(path, 'wx', 0o600);
  await fh.close();
  try {
    await createQcow2Image(path, { size: base.length() });
  } catch (e) {
    await unlink(path).catch(() => undefined);
    throw e;
  }
}

/**
 * Opens the overlay file at `path` as node `nodeName` of `graph`, writable,
 * with the open node `base` (of the same graph) as its backing. An existing
 * overlay (a restarted agent adopting its export) must still match: no
 * backing name of its own, the size of `base`.
 */
export async function openOverlay(
  graph: BlockGraph,
  nodeName: string,
  path: string,
  base: BlockNode,
): Promise<BlockNode> {
  const node = await graph.openNode({
    driver: 'qcow2',
    nodeName,
    readOnly: false,
    file: { driver: 'file', filename: path, readOnly: false },
    backing: base.nodeName,
  });
  const recorded = node.imageInfo?.().backingFilename;
  const bad =
    recorded !== undefined
      ? `it names a backing file ('${recorded}'); overlays made here never do`
      : node.length() !== base.length()
        ? `its size (${node.length()}) is not the image's (${base.length()})`
        : undefined;
  if (bad !== undefined) {
    await graph.closeNode(nodeName).catch(() => undefined);
    throw new BlkError(
      'IMAGE_INVALID',
      `overlay '${path}' does not belong to node '${base.nodeName}': ${bad}`,
      {
        file: path,
      },
    );
  }
  return node;
}
