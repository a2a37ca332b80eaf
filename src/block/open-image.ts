/**
 * The one-call entry point for commands: open an image file (its fd is held
 * before anything else happens, so a mount over the image itself works),
 * probe or take its format, and stack the format node on top.
 */
import { realpath } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { BlkError } from '../errors.js';
import { BlockGraph } from './graph.js';
import { makePathPolicy } from './path-policy.js';
import { probeNode } from './probe.js';
import type { BlockNode } from './types.js';

export interface OpenImageOptions {
  filename: string;
  /** 'auto' (default) probes the first bytes: qcow2, vhdx or raw. */
  format?: 'auto' | 'raw' | 'qcow2' | 'vhdx';
  readOnly: boolean;
  /** Name of the format node (default: 'image'); the file node is `<name>-file`. */
  nodeName?: string;
  /** 'follow' (default): open the image's own backing file inside allowedRoots; 'none': no backing. */
  backing?: 'follow' | 'none';
  /** Directories backing files and data files may live in (default: the image's own directory). */
  allowedRoots?: string[];
  /** Bound of the qcow2 L2-table cache in bytes. */
  l2CacheBytes?: number;
  /** QEMU-compatible image locking of the image file (default auto); 'off' is qemu-img's -U. */
  locking?: 'auto' | 'on' | 'off';
}

export interface OpenedImage {
  node: BlockNode;
  /** The format actually opened ('raw', 'qcow2' or 'vhdx'). */
  format: string;
  /** Every node of the graph (format node, file node, backing chain). */
  graph: BlockGraph;
  close(): Promise<void>;
}

/** Opens an image file as a block node (format probed unless given); close() releases the whole graph. */
export async function openImage(opts: OpenImageOptions): Promise<OpenedImage> {
  const filename = resolve(opts.filename);
  const nodeName = opts.nodeName ?? 'image';
  let roots = opts.allowedRoots;
  if (roots === undefined) {
    let real = filename;
    try {
      real = await realpath(filename);
    } catch {
      // open() below reports the real problem
    }
    roots = [dirname(real)];
  }
  const graph = new BlockGraph(await makePathPolicy(roots));
  try {
    const file = await graph.openNode({
      driver: 'file',
      nodeName: `${nodeName}-file`,
      filename,
      readOnly: opts.readOnly,
      ...(opts.locking !== undefined ? { locking: opts.locking } : {}),
    });
    const requested = opts.format ?? 'auto';
    const format = requested === 'auto' ? await probeNode(file) : requested;
    if (format !== 'raw' && format !== 'qcow2' && format !== 'vhdx') {
      throw new BlkError('USAGE', `unknown format '${String(format)}'`, { file: filename });
    }
    const node = await graph.openNode({
      driver: format,
      nodeName,
      file: `${nodeName}-file`,
      readOnly: opts.readOnly,
      ...((format === 'qcow2' || format === 'vhdx') && opts.backing === 'none' ? { backing: null } : {}),
      ...(opts.l2CacheBytes !== undefined ? { l2CacheBytes: opts.l2CacheBytes } : {}),
    });
    return { node, format, graph, close: () => graph.close() };
  } catch (e) {
    await graph.close().catch(() => {});
    throw e;
  }
}
