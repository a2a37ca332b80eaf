/**
 * The one-shot export behind `blkexport mount`: one image, optionally one
 * partition of it, one FUSE export, no manifest. The image is opened (its fd
 * held) before the mount covers its name, so mounting an image on itself works.
 */
import { realpath, unlink } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import type { BlockGraph } from '../block/graph.js';
import { openImage } from '../block/open-image.js';
import { isInsideRoot, makePathPolicy } from '../block/path-policy.js';
import type { ProbedFormat } from '../block/probe.js';
import type { BlockNode } from '../block/types.js';
import { BlkError, describeError } from '../errors.js';
import { createMountpoint, fuseExportDriver } from '../export/fuse/driver.js';
import type { AllowOther, FuseExport } from '../export/fuse/export.js';
import { fsnameFor, mountedPath, mountOwner, readMountTable, topMountAt } from '../export/mount-table.js';
import { probeFromChild } from '../export/probe.js';
import { ExportRegistry } from '../export/registry.js';
import { EphemeralOverlays } from './overlays.js';
import { probedRawError } from './rules.js';

export interface OneShotOptions {
  image: string;
  mountpoint?: string;
  format: 'auto' | ProbedFormat;
  writable: boolean;
  growable: boolean;
  allowOther: AllowOther;
  partition?: number;
  /** qcow2: a read-only view of this internal snapshot (id, else name). */
  snapshot?: string;
  createMountpoint: boolean;
  /**
   * A writable view whose writes go to a throwaway qcow2 overlay in `dir`
   * (unlinked as soon as it is open: gone with the process, however it ends);
   * the image is opened read-only with force-share.
   */
  overlay?: { dir: string };
  /** Directories the image and the backing/data files it names must lie in (default: the image's directory). */
  allowRoots: string[];
}

export interface OneShot {
  image: string;
  mountpoint: string;
  format: string;
  /** The internal snapshot shown, when a snapshot view. */
  snapshot: { id: string; name: string } | undefined;
  /** The partition exported, with its window in the image. */
  partition: { index: number; offset: number; size: number; scheme: 'mbr' | 'gpt' } | undefined;
  export: FuseExport;
  /** overlay: the directory the (already unlinked) overlay file was made in. */
  overlayDir: string | undefined;
  /** Bytes presented at the mountpoint. */
  size: number;
  /** Flushes, unmounts, closes the image, removes a mountpoint we created. */
  stop(): Promise<void>;
}

async function assertInsideRoots(path: string, roots: string[], what: string): Promise<void> {
  let real: string;
  try {
    real = await realpath(path);
  } catch {
    return; // a missing path is reported by whoever opens it, with QSD's wording
  }
  if (!roots.some((r) => isInsideRoot(real, r))) {
    throw new BlkError(
      'PATH_POLICY',
      `${what} '${path}' (${real}) is outside the allowed roots (${roots.join(', ')})`,
    );
  }
}

/** What a one-shot export (FUSE or NBD) opens: the image, its format, one partition of it. */
export interface OneShotImageOptions {
  image: string;
  format: 'auto' | ProbedFormat;
  /** The export writes into the image (not into an overlay). */
  writable: boolean;
  /** Open the image read-only with QEMU's force-share locking (an overlay view of an image in use). */
  forceShare?: boolean;
  partition?: number;
  /** qcow2: a read-only view of this internal snapshot (id, else name). */
  snapshot?: string;
  /** Directories the image and the backing/data files it names must lie in (default: the image's directory). */
  allowRoots: string[];
  /** Paths (besides the image) another blkexport mount must not cover. */
  alsoUnmounted?: string[];
}

/** An opened one-shot image: the node to export and how to close it. */
export interface OneShotImage {
  image: string;
  format: string;
  node: BlockNode;
  /** The graph the image's nodes live in (an overlay goes into it too). */
  graph: BlockGraph;
  partition: OneShot['partition'];
  snapshot: OneShot['snapshot'];
  /** The allowed roots, resolved. */
  roots: string[];
  close(): Promise<void>;
}

/** The partition filter over the format node (the graph closes it with the image), or the format node. */
async function selectPartition(
  graph: BlockGraph,
  top: BlockNode,
  index: number | undefined,
  readOnly: boolean,
  image: string,
): Promise<{ node: BlockNode; partition: OneShot['partition'] }> {
  if (index === undefined) return { node: top, partition: undefined };
  const node = await graph.openNode({
    driver: 'partition',
    nodeName: `${top.nodeName}-part${index}`,
    file: top.nodeName,
    number: index,
    readOnly,
  });
  const { offset, scheme } = node.resolved?.() ?? {};
  if (offset === undefined || scheme === undefined)
    throw new BlkError('INTERNAL', `the partition filter reported no window for '${image}'`);
  return { node, partition: { index, offset, size: node.length(), scheme } };
}

/**
 * Opens the image for a one-shot export with the path policy, probing and
 * locking every export uses, and selects the partition; refuses a probed-raw
 * image for writing. The caller closes it.
 */
export async function openOneShotImage(o: OneShotImageOptions): Promise<OneShotImage> {
  const image = resolve(o.image);
  const rootsGiven = o.allowRoots.length ? o.allowRoots : [dirname(image)];
  const policy = await makePathPolicy(rootsGiven);
  const roots = policy.allowedRoots === 'any' ? [] : [...policy.allowedRoots];
  if (roots.length === 0)
    throw new BlkError('PATH_POLICY', `none of the allowed roots exists (${rootsGiven.join(', ')})`);
  await assertInsideRoots(image, roots, 'image');
  // Another blkexport process may serve this path already; opening the image
  // then would open that export's raw view instead of the image underneath.
  for (const path of new Set([...(o.alsoUnmounted ?? []), image])) {
    const top = topMountAt(await readMountTable(), path);
    if (top && mountOwner(top))
      throw new BlkError('EXPORT_EXISTS', `There already is a FUSE export on '${path}'`);
  }

  const opened = await openImage({
    filename: image,
    format: o.format,
    readOnly: !o.writable,
    ...(o.forceShare ? { forceShare: true } : {}),
    allowedRoots: roots,
    ...(o.snapshot !== undefined ? { snapshot: o.snapshot } : {}),
  });
  try {
    if (o.writable && o.format === 'auto' && opened.format === 'raw')
      throw probedRawError(`'${image}'`, '--format raw');
    const { node, partition } = await selectPartition(
      opened.graph,
      opened.node,
      o.partition,
      !o.writable,
      image,
    );
    return {
      image,
      format: opened.format,
      node,
      graph: opened.graph,
      partition,
      snapshot: opened.node.resolved?.().snapshot,
      roots,
      close: () => opened.close(),
    };
  } catch (e) {
    await opened.close().catch(() => undefined);
    throw e;
  }
}

/** Opens the image, selects the partition, mounts the export and checks it from another process. */
export async function startOneShot(o: OneShotOptions): Promise<OneShot> {
  const image = resolve(o.image);
  // Symlinks resolved as the kernel resolves them: the mount table (and `umount`) name the target.
  const mountpoint = await mountedPath(o.mountpoint ?? image);
  const overlay = o.overlay;
  // An overlay export writes into its overlay only: the image (and every node under the overlay) is read-only.
  const writesImage = o.writable && overlay === undefined;
  const opened = await openOneShotImage({
    image,
    format: o.format,
    writable: writesImage,
    forceShare: overlay !== undefined,
    allowRoots: o.allowRoots,
    alsoUnmounted: [mountpoint],
    ...(o.partition !== undefined ? { partition: o.partition } : {}),
    ...(o.snapshot !== undefined ? { snapshot: o.snapshot } : {}),
  });
  const { partition } = opened;
  const cleanups: Array<() => Promise<void>> = [() => opened.close()];
  const closeAll = async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  };
  try {
    let node = opened.node;

    if (overlay !== undefined) {
      const overlays = new EphemeralOverlays(overlay.dir, true);
      const ov = await overlays.create(opened.graph, 'mount', node);
      cleanups.push(() => overlays.drop(opened.graph, ov));
      node = ov.node;
    }

    // The mountpoint is the user's choice, typed on the command line like the image: it is not confined.
    // Confinement is for paths read from images (backing and data files) and from manifests.
    const created = o.createMountpoint ? await createMountpoint(mountpoint) : false;
    if (created) cleanups.unshift(() => unlink(mountpoint).catch(() => undefined));

    const registry = new ExportRegistry();
    const exp = await registry.add(fuseExportDriver, node, {
      id: 'exp0',
      mountpoint,
      writable: o.writable || overlay !== undefined,
      growable: o.growable,
      allowOther: o.allowOther,
      fsname: fsnameFor('mount', process.pid),
    });
    // The block layer's own reason for a failed probe read (which table, which offset) beats the
    // child's "Input/output error".
    let firstError: unknown;
    exp.onError = (_op, err) => {
      firstError ??= err;
    };
    const probe = await probeFromChild(mountpoint);
    exp.onError = undefined;
    if (!probe.ok) {
      await registry.remove('exp0').catch(() => undefined);
      const why = firstError === undefined ? probe.reason : describeError(firstError);
      throw new BlkError('MOUNT_FAILED', `'${image}' is mounted on '${mountpoint}' but not readable: ${why}`);
    }
    let stopped = false;
    return {
      image,
      mountpoint,
      format: opened.format,
      snapshot: opened.snapshot,
      partition,
      overlayDir: overlay?.dir,
      export: exp,
      size: node.length(),
      async stop() {
        if (stopped) return;
        stopped = true;
        try {
          await registry.remove('exp0');
        } finally {
          await closeAll();
        }
      },
    };
  } catch (e) {
    await closeAll();
    throw e;
  }
}
