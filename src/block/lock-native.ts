/**
 * Loads blkexport's N-API helper (native/, built by `npm run build:native`):
 * the Linux calls Node lacks — OFD byte-range locks, SO_PEERCRED, and the fd
 * holder that keeps FUSE connections across agent restarts (SCM_RIGHTS).
 * Loaded lazily, once; a missing build is reported as a BlkError naming the fix.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { BlkError } from '../errors.js';

/** The addon's interface (see native/blkexport_native.c). */
export interface NativeHelper {
  /** fcntl(F_OFD_SETLK): 0, or -errno. */
  ofdSetLock(fd: number, start: number, len: number, type: number): number;
  /** fcntl(F_OFD_GETLK): the type of a conflicting lock (F_UNLCK when none), or -errno. */
  ofdTestLock(fd: number, start: number, len: number, type: number): number;
  /** getsockopt(SO_PEERCRED) on a connected Unix socket; throws on failure. */
  peerCredentials(fd: number): { pid: number; uid: number; gid: number };
  /** Runs the fd holder on the Unix socket `path` until it ends (blocks the calling thread). */
  /** Serves until the holder ends; false at once when another holder already serves `path`. */
  holderServe(path: string, idleSeconds: number): boolean;
  /** One request to the fd holder on `path`; descriptors in the answer are now the caller's. Throws when it cannot talk to it. */
  holderRequest(
    path: string,
    op: 'PUT' | 'DROP' | 'LIST' | 'GET' | 'PING' | 'QUIT',
    name: string,
    mountpoint: string,
    meta: Buffer,
    fds: number[],
  ): { ok: boolean; text: string; name?: string; mountpoint?: string; meta?: Buffer; fds: number[] };
  /** close(2): 0 or -errno. */
  closeFd(fd: number): number;
  /** umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW), as `umount -l` (root): 0 or -errno. */
  lazyUnmount(path: string): number;
  /** lazyUnmount in libuv's thread pool (several at once; the event loop goes on). */
  lazyUnmountAsync(path: string): Promise<number>;
  /** The id of the mount on `path` (mountinfo's first field) by statx, without asking a FUSE server; or -errno. */
  mountIdAsync(path: string): Promise<number>;
  readonly F_RDLCK: number;
  readonly F_WRLCK: number;
  readonly F_UNLCK: number;
}

// src/block/ and dist/block/ both sit two levels below the repository root.
const ADDON = new URL('../../native/build/Release/blkexport_native.node', import.meta.url).pathname;

let cached: NativeHelper | undefined;

/** The native helper; throws BlkError INTERNAL when it was not built. */
export function nativeHelper(): NativeHelper {
  if (cached) return cached;
  if (!existsSync(ADDON)) {
    throw new BlkError(
      'INTERNAL',
      `the native helper is not built (${ADDON}); run 'npm run build:native' (needs make, cc, python3)`,
    );
  }
  cached = createRequire(import.meta.url)(ADDON) as NativeHelper;
  return cached;
}
