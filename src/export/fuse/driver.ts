/**
 * The FUSE export type: one node as one raw file on a mountpoint. Checks
 * that belong to FUSE alone live here (the mountpoint is an absolute path to
 * an existing regular file, one export per mountpoint); the rest of the
 * checks are the export core's.
 */
import { stat, writeFile } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { BlkError } from '../../errors.js';
import type { ExportDriver } from '../driver.js';
import { FuseExport, type FuseExportOptions } from './export.js';
import type { FuseInit } from './file-fs.js';

/** Checks that `mountpoint` is an absolute path to an existing regular file (QSD's messages). */
export async function checkMountpoint(mountpoint: string): Promise<void> {
  if (!isAbsolute(mountpoint)) {
    throw new BlkError('EXPORT_INVALID', `mountpoint '${mountpoint}' must be an absolute path`);
  }
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(mountpoint);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'No such file or directory' : (e as Error).message;
    throw new BlkError('EXPORT_INVALID', `Failed to stat '${mountpoint}': ${why}`);
  }
  if (!st.isFile()) throw new BlkError('EXPORT_INVALID', `'${mountpoint}' is not a regular file`);
}

/** Creates an empty mountpoint file (create-mountpoint, mode 0600); true when it created one, false when one exists. */
export async function createMountpoint(path: string): Promise<boolean> {
  try {
    await writeFile(path, '', { flag: 'wx', mode: 0o600 });
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
}

/** A FUSE connection kept outside the process that mounted it, to adopt. */
export interface HeldFuse {
  fd: number;
  init: FuseInit;
  /** The kernel granted allow_other to the mount. */
  allowsOther: boolean;
  /** Ask the kernel to requeue what the previous server had read but not answered. */
  resend: boolean;
}

export const fuseExportDriver: ExportDriver<FuseExportOptions, FuseExport, HeldFuse> = {
  type: 'fuse',
  mutableOptions: ['writable', 'growable', 'allow-other'],
  // By string: stat-ing a mountpoint our own export may cover could deadlock.
  claim: (o) => ({
    key: `mountpoint:${o.mountpoint}`,
    taken: `There already is a FUSE export on '${o.mountpoint}'`,
  }),
  async start(node, opts) {
    await checkMountpoint(opts.mountpoint);
    return FuseExport.start(node, opts).catch((e: Error) => {
      throw new BlkError('MOUNT_FAILED', e.message, {}, { cause: e });
    });
  },
  // No mountpoint check: the mount is there already (and stat-ing it would ask it, unserved).
  adopt: (node, opts, held) => FuseExport.adopt(node, opts, held),
};
