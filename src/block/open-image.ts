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
import { PROBED_FORMATS, type ProbedFormat, probeNode } from './probe.js';
import type { BlockNode } from './types.js';

export interface OpenImageOptions {
  filename: string;
  /** 'auto' (default) probes the first bytes (qcow2, raw, vpc, vdi, qed, vmdk); vpc, vdi, qed and vmdk open read-only. */
  format?: 'auto' | ProbedFormat;
  readOnly: boolean;
  /** Name of the format node (default: 'image'); the file node is `<name>-file`. */
  nodeName?: string;
  /** 'follow' (default): open the image's own backing file inside allowedRoots; 'none': no backing. */
  backing?: 'follow' | 'none';
  /** Directories backing files and data files may live in (default: the image's own directory). */
  allowedRoots?: string[];
  /** Bound of the qcow2 L2-table cache in bytes. */
  l2CacheBytes?: number;
  /** qcow2: a read-only view of this internal snapshot (id, else name), like `qemu-nbd -l`. */
  snapshot?: string;
  /** QEMU-compatible image locking of the image file (default auto); 'off' is qemu-img's -U. */
  locking?: 'auto' | 'on' | 'off';
  /** QEMU's force-share (read-only only): lock as a reader that refuses others nothing. */
  forceShare?: boolean;
}

export interface OpenedImage {
  node: BlockNode;
  /** The format actually opened (one of PROBED_FORMATS). */
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
      ...(opts.forceShare ? { forceShare: true } : {}),
    });
    const requested = opts.format ?? 'auto';
    const format = requested === 'auto' ? await probeNode(file) : requested;
    if (!(PROBED_FORMATS as readonly string[]).includes(format)) {
      throw new BlkError('USAGE', `unknown format '${String(format)}'`, { file: filename });
    }
    if (opts.snapshot !== undefined && format !== 'qcow2') {
      throw new BlkError('USAGE', `internal snapshots are a qcow2 feature; this image is ${format}`, {
        file: filename,
        field: 'snapshot',
      });
    }
    const node = await graph.openNode({
      driver: format,
      nodeName,
      file: `${nodeName}-file`,
      readOnly: opts.readOnly,
      ...(format !== 'raw' && opts.backing === 'none' ? { backing: null } : {}),
      ...(opts.l2CacheBytes !== undefined ? { l2CacheBytes: opts.l2CacheBytes } : {}),
      ...(opts.snapshot !== undefined ? { snapshot: opts.snapshot } : {}),
    });
    return { node, format, graph, close: () => graph.close() };
  } catch (e) {
    await graph.close().catch(() => {});
    throw e;
  }
}
