/** A raw window (offset/size) over an already open node, e.g. one partition of an image. */
import { rawFormat } from './format/raw.js';
import { type GraphNode, wrapNode } from './node.js';
import type { BlockNode } from './types.js';

/** Opens a `raw` node showing [offset, offset+size) of `base`; its close() leaves `base` open. */
export async function openRawWindow(
  base: BlockNode,
  offset: number,
  size: number,
  nodeName: string,
): Promise<GraphNode> {
  const state = await rawFormat.open({
    nodeName,
    readOnly: base.readOnly,
    options: { driver: 'raw', nodeName, offset, size },
    file: base,
    backing: undefined,
    policy: { allowedRoots: [] },
    chain: { depth: 0, seen: new Set() },
    openChild: () => Promise.reject(new Error('a raw window opens no children')),
  });
  return wrapNode(rawFormat, state, {
    nodeName,
    readOnly: base.readOnly,
    filename: base.filename,
    fileKey: base.fileKey,
  });
}
