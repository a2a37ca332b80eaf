/**
 * The one-shot export behind `blkexport mount`: one image, optionally one
 * partition of it, one FUSE export, no manifest. The image is opened (its fd
 * held) before the mount covers its name, so mounting an image on itself works.
 */
import { open as fsOpen, realpath, stat, unlink } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { openImage } from '../block/open-image.js';
import { findPartition, type Partition } from '../block/partition.js';
import { isInsideRoot, makePathPolicy } from '../block/path-policy.js';
import type { BlockNode } from '../block/types.js';
import { BlkError } from '../errors.js';
import type { AllowOther, FuseExport } from '../export/fuse/export.js';
import { fsnameFor, mountOwner, readMountTable, topMountAt } from '../export/mount-table.js';
import { probeFromChild } from '../export/probe.js';
import { ExportRegistry } from '../export/registry.js';

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
  partition: Partition | undefined;
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

/** Creates an empty regular file for --create-mountpoint; returns true when it created one. */
async function createMountpoint(path: string): Promise<boolean> {
  try {
    await stat(path);
    return false;
  } catch {
    const fh = await fsOpen(path, 'wx', 0o600);
    await fh.close();
    return true;
  }
}

/** Opens the image, selects the partition, mounts the export and checks it from another process. */
export async function startOneShot(o: OneShotOptions): Promise<OneShot> {
  const image = resolve(o.image);
  const mountpoint = resolve(o.mountpoint ?? image);
  const rootsGiven = o.allowRoots.length ? o.allowRoots : [dirname(image)];
  const policy = await makePathPolicy(rootsGiven);
  const roots = policy.allowedRoots === 'any' ? [] : [...policy.allowedRoots];
  if (roots.length === 0)
    throw new BlkError('PATH_POLICY', `none of the allowed roots exists (${rootsGiven.join(', ')})`);
  await assertInsideRoots(image, roots, 'image');
  // Another blkexport process may serve this path already; opening the image
  // then would open that export's raw view instead of the image underneath.
  for (const path of new Set([mountpoint, image])) {
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
  const cleanups: Array<() => Promise<void>> = [() => opened.close()];
  const closeAll = async () => {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  };
  try {
    if (o.writable && o.format === 'auto' && opened.format === 'raw') {
      throw new BlkError(
        'EXPORT_INVALID',
        `refusing to write to '${image}': its format was only probed as raw; give --format raw to confirm ` +
          '(a guest could have written an image header into it)',
      );
    }
    let node: BlockNode = opened.node;
    let partition: Partition | undefined;
    if (o.partition !== undefined) {
      const base = node;
      const read = async (off: number, len: number) => {
        const buf = Buffer.alloc(len);
        await base.read(off, buf);
        return buf;
      };
      partition = await findPartition(read, base.length(), o.partition, image);
      // A raw window over the format node; the graph closes it with the image.
      node = await opened.graph.openNode({
        driver: 'raw',
        nodeName: `${base.nodeName}-part${partition.index}`,
        file: base.nodeName,
        offset: partition.offset,
        size: partition.size,
        readOnly: !o.writable,
      });
    }

    const created = o.createMountpoint ? await createMountpoint(mountpoint) : false;
    if (created) cleanups.unshift(() => unlink(mountpoint).catch(() => undefined));
    await assertInsideRoots(mountpoint, roots, 'mountpoint');

    const registry = new ExportRegistry();
    const exp = await registry.addFuse(node, {
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
