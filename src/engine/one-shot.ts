/**
 * The one-shot export behind `blkexport mount`: one image, optionally one
 * partition of it, one FUSE export, no manifest. The image is opened (its fd
 * held) before the mount covers its name, so mounting an image on itself works.
 */
import { realpath, unlink } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { openImage } from '../block/open-image.js';
import { isInsideRoot, makePathPolicy } from '../block/path-policy.js';
import type { BlockNode } from '../block/types.js';
import { BlkError } from '../errors.js';
import { createMountpoint, fuseExportDriver } from '../export/fuse/driver.js';
import type { AllowOther, FuseExport } from '../export/fuse/export.js';
import { fsnameFor, mountOwner, readMountTable, topMountAt } from '../export/mount-table.js';
import { probeFromChild } from '../export/probe.js';
import { ExportRegistry } from '../export/registry.js';
import { probedRawError } from './rules.js';

export interface OneShotOptions {
  image: string;
  mountpoint?: string;
  format: 'auto' | 'raw' | 'qcow2';
  writable: boolean;
  growable: boolean;
  allowOther: AllowOther;
  partition?: number;
  createMountpoint: boolean;
  /** Directories image, backing files and mountpoint must lie in (default: the image's directory). */
  allowRoots: string[];
}

export interface OneShot {
  image: string;
  mountpoint: string;
  format: string;
  /** The partition exported, with its window in the image. */
  partition: { index: number; offset: number; size: number; scheme: 'mbr' | 'gpt' } | undefined;
  export: FuseExport;
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
  format: 'auto' | 'raw' | 'qcow2';
  writable: boolean;
  partition?: number;
  /** Directories the image and its backing files must lie in (default: the image's directory). */
  allowRoots: string[];
  /** Paths (besides the image) another blkexport mount must not cover. */
  alsoUnmounted?: string[];
}

/** An opened one-shot image: the node to export and how to close it. */
export interface OneShotImage {
  image: string;
  format: string;
  node: BlockNode;
  partition: OneShot['partition'];
  /** The allowed roots, resolved. */
  roots: string[];
  close(): Promise<void>;
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
    allowedRoots: roots,
  });
  try {
    if (o.writable && o.format === 'auto' && opened.format === 'raw')
      throw probedRawError(`'${image}'`, '--format raw');
    let node: BlockNode = opened.node;
    let partition: OneShot['partition'];
    if (o.partition !== undefined) {
      // The partition filter over the format node; the graph closes it with the image.
      node = await opened.graph.openNode({
        driver: 'partition',
        nodeName: `${opened.node.nodeName}-part${o.partition}`,
        file: opened.node.nodeName,
        number: o.partition,
        readOnly: !o.writable,
      });
      const { offset, scheme } = node.resolved?.() ?? {};
      if (offset === undefined || scheme === undefined)
        throw new BlkError('INTERNAL', `the partition filter reported no window for '${image}'`);
      partition = { index: o.partition, offset, size: node.length(), scheme };
    }
    return { image, format: opened.format, node, partition, roots, close: () => opened.close() };
  } catch (e) {
    await opened.close().catch(() => undefined);
    throw e;
  }
}

/** Opens the image, selects the partition, mounts the export and checks it from another process. */
export async function startOneShot(o: OneShotOptions): Promise<OneShot> {
  const image = resolve(o.image);
  const mountpoint = resolve(o.mountpoint ?? image);
  const opened = await openOneShotImage({
    image,
    format: o.format,
    writable: o.writable,
    allowRoots: o.allowRoots,
    alsoUnmounted: [mountpoint],
    ...(o.partition !== undefined ? { partition: o.partition } : {}),
  });
  const { node, partition, roots } = opened;
  const cleanups: Array<() => Promise<void>> = [() => opened.close()];
  const closeAll = async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  };
  try {
    const created = o.createMountpoint ? await createMountpoint(mountpoint) : false;
    if (created) cleanups.unshift(() => unlink(mountpoint).catch(() => undefined));
    await assertInsideRoots(mountpoint, roots, 'mountpoint');

    const registry = new ExportRegistry();
    const exp = await registry.add(fuseExportDriver, node, {
      id: 'exp0',
      mountpoint,
      writable: o.writable,
      growable: o.growable,
      allowOther: o.allowOther,
      fsname: fsnameFor('mount', process.pid),
    });
    const probe = await probeFromChild(mountpoint);
    if (!probe.ok) {
      await registry.remove('exp0').catch(() => undefined);
      throw new BlkError(
        'MOUNT_FAILED',
        `export on '${mountpoint}' is mounted but not readable: ${probe.reason}`,
      );
    }
    let stopped = false;
    return {
      image,
      mountpoint,
      format: opened.format,
      partition,
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
