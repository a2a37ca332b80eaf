/**
 * Picks the FUSE binding: our libfuse 3 addon when it is built (1 MiB
 * requests, async direct I/O, fallocate), else fuse-native (libfuse 2).
 * BLKEXPORT_FUSE=fuse3 or fuse-native forces one.
 */
import { BlkError } from '../../errors.js';
import type { FileFsMount, FileFsOps, FuseInit, MountOptions } from './file-fs.js';
import { mountFileFsFuseNative } from './fuse-native.js';
import { adoptFileFsFuse3, fuse3Unavailable, mountFileFsFuse3 } from './fuse3.js';

export type FuseBackend = 'fuse3' | 'fuse-native';

/** The binding mounts use in this process. */
export function fuseBackend(): FuseBackend {
  const forced = process.env.BLKEXPORT_FUSE;
  if (forced === 'fuse3' || forced === 'fuse-native') return forced;
  return fuse3Unavailable() ? 'fuse-native' : 'fuse3';
}

/** Mounts a one-file filesystem with the chosen binding. */
export function mountFileFs(mountpoint: string, ops: FileFsOps, options: MountOptions): Promise<FileFsMount> {
  return fuseBackend() === 'fuse3'
    ? mountFileFsFuse3(mountpoint, ops, options)
    : mountFileFsFuseNative(mountpoint, ops, options);
}

/**
 * Serves a connection another process mounted and kept (`fd`, with what its
 * INIT negotiated): only our libfuse 3 binding can; `resend` asks the kernel
 * to requeue what the previous server had read but not answered.
 */
export function adoptFileFs(
  mountpoint: string,
  fd: number,
  init: FuseInit,
  ops: FileFsOps,
  resend: boolean,
): Promise<FileFsMount> {
  if (fuseBackend() !== 'fuse3')
    return Promise.reject(
      new BlkError(
        'NOT_SUPPORTED',
        `adopting a FUSE connection needs the libfuse 3 binding (${fuse3Unavailable()})`,
      ),
    );
  return adoptFileFsFuse3(fd, init, ops, { mountpoint, resend });
}
