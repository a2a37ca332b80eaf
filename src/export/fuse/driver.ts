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

export const fuseExportDriver: ExportDriver<FuseExportOptions, FuseExport> = {
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
};
