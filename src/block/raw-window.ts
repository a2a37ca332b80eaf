/** A raw window (offset/size) over an already open node, outside any graph. */
import { rawFormat } from './format/raw.js';
import { type GraphNode, wrapNode } from './node.js';
import type { BlockNode } from './types.js';
import { checkWindow, type WindowState } from './window.js';

/** Opens a `raw` node showing [offset, offset+size) of `base`; its close() leaves `base` open. */
export async function openRawWindow(
  base: BlockNode,
  offset: number,
  size: number,
  nodeName: string,
): Promise<GraphNode> {
  checkWindow(base, offset, size, 'raw');
  const state: WindowState = { child: base, offset, size, fixed: true, readOnly: base.readOnly };
  return wrapNode(rawFormat, state, {
    nodeName,
    readOnly: base.readOnly,
    filename: base.filename,
    fileKey: base.fileKey,
  });
}
