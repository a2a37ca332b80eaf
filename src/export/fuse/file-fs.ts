/**
 * The contract between the FUSE export and a FUSE binding: a filesystem whose
 * root node is one regular file. Two bindings implement it: fuse3.ts (our own
 * libfuse 3 addon, native-fuse/) and fuse-native.ts (the fuse-native package,
 * libfuse 2); mount.ts picks one.
 */
import { execFile } from 'node:child_process';
import { constants } from 'node:os';
import { nativeHelper } from '../../block/lock-native.js';
import type { HostExtent } from '../../block/types.js';
import { BlkError, Errno } from '../../errors.js';
import { mountTableChanging } from '../mount-table.js';

/** An error that answers a FUSE request with a specific errno. */
export class FuseErrno extends BlkError {
  constructor(errno: number, message = `errno ${errno}`) {
    super('ERRNO', message, {}, { errno });
  }
}

/** Attributes of the root file. */
export interface FileAttr {
  mode: number;
  uid: number;
  gid: number;
  size: number;
  blocks: number;
  mtime: Date;
  atime: Date;
  ctime: Date;
}

/**
 * How an open is answered (the libfuse 3 binding only; fuse-native ignores it).
 * backingId > 0: the kernel does this file's reads and writes on the backing
 * file registered for passthrough (FOPEN_PASSTHROUGH); with directIo as well,
 * reads and writes come to us uncached and only mmap goes to the backing file.
 */
export interface OpenAnswer {
  backingId?: number;
  directIo?: boolean;
}

/** What a single-file FUSE filesystem implements. Throw FuseErrno (or anything with a numeric `errno`) to fail. */
export interface FileFsOps {
  getattr(): Promise<FileAttr>;
  open(flags: number): OpenAnswer | undefined;
  read(buf: Buffer, length: number, position: number): Promise<number>;
  write(buf: Buffer, length: number, position: number): Promise<number>;
  truncate(size: number): Promise<void>;
  chmod(mode: number): void;
  chown(uid: number, gid: number): void;
  utimens(): void;
  flush(): Promise<void>;
  fsync(): Promise<void>;
  /** fallocate(2) on the file: mode bits as the kernel gives them (absent: EOPNOTSUPP). */
  fallocate?(mode: number, offset: number, length: number): Promise<void>;
  /** lseek SEEK_DATA (3) / SEEK_HOLE (4): the offset found (absent: EOPNOTSUPP). */
  seek?(offset: number, whence: number): Promise<number>;
  /** Called for every failure answered with EIO (for metrics and logs). */
  onError?(op: string, err: unknown): void;
}

export interface MountOptions {
  readOnly: boolean;
  allowOther: boolean;
  /** fsname shown in /proc/mounts (no commas or spaces). */
  fsname: string;
  /** subtype: the mount shows as fuse.<subtype>. */
  subtype: string;
  /** Largest read request in bytes (libfuse 2 caps requests at 128 KiB). */
  maxRead: number;
  /**
   * A descriptor of the image file to use for FUSE passthrough (libfuse 3
   * binding only): FUSE_PASSTHROUGH is asked for at INIT and the file
   * registered right after; passthrough() says how that went.
   */
  passthroughFd?: number;
}

/**
 * How FUSE passthrough went on a connection (undefined from passthrough()
 * until the kernel's INIT is answered): `offered` by the kernel at INIT,
 * `negotiated` by us, and the backing id OPEN answers with (0: none, then
 * `errno` says why: EOPNOTSUPP not offered or not asked, EPERM without
 * CAP_SYS_ADMIN, ELOOP for an image on a stacked filesystem).
 */
export interface PassthroughInfo {
  offered: boolean;
  negotiated: boolean;
  backingId: number;
  errno: number;
}

/**
 * Reads and in-place writes served by the binding itself from host extents
 * the export installs (see native-fuse/fast_map.c, fast_write.c). The export
 * invalidates around every change.
 */
export interface FastPath {
  /** The current generation; an install computed at an older one skips the granules changed since. */
  gen(): number;
  /**
   * Remembers where guest bytes from `offset` live (whole 64 KiB granules
   * only); granules inside a `writable` extent may then be written in place.
   */
  install(gen: number, offset: number, extents: readonly HostExtent[]): void;
  /**
   * Forgets [offset, offset+length) and moves the generation; `size` (when
   * given) bounds reads and writes. Returns once no native write can still
   * be using the old mapping, unless `wait` is false (for a caller whose
   * change moved nothing that was installed writable).
   */
  invalidate(offset: number, length: number, size?: number, wait?: boolean): void;
  enable(on: boolean): void;
  /** Whether writable granules are written by the binding; off returns once none is in flight. */
  allowWrites(on: boolean): void;
  /** Reads, writes and their bytes served without JavaScript. */
  stats(): { reads: number; bytes: number; writes: number; writeBytes: number };
}

/**
 * What the kernel and the server agreed at FUSE INIT (fuse_init_in/out in
 * <linux/fuse.h>): a successor serving the same connection needs it, since
 * the kernel sends INIT only once. Plain numbers, so it travels as JSON.
 */
export interface FuseInit {
  /** The protocol the connection speaks: 7, and the minor the server answered. */
  major: number;
  minor: number;
  /** What the kernel offered: its minor, its flags (low 32 bits) and flags2 (high 32 bits). */
  kernelMinor: number;
  kernelFlags: number;
  kernelFlags2: number;
  /** What the server answered: flags and flags2 (FUSE_ASYNC_READ, FUSE_MAX_PAGES, ...). */
  flags: number;
  flags2: number;
  maxWrite: number;
  maxReadahead: number;
  maxPages: number;
  maxBackground: number;
  congestionThreshold: number;
  timeGran: number;
  /** The kernel offered FUSE_HAS_RESEND (Linux 6.9+): a successor can have the dead server's requests resent. */
  resend: boolean;
  /**
   * The passthrough backing id the first server registered on the connection
   * (0 or absent: none). A successor must answer OPEN with this one: the
   * kernel refuses another backing file for the inode while files opened
   * with this one are open.
   */
  backingId?: number;
}

/** A mounted single-file filesystem. */
export interface FileFsMount {
  readonly mountpoint: string;
  /** Lazily unmounts; requests on descriptors still open are answered by `ops` until they close. */
  unmount(): Promise<void>;
  /** Resolves when the kernel connection is gone (libfuse 3 binding only). */
  ended?: Promise<void>;
  /** The native read fast path (libfuse 3 binding only). */
  fast?: FastPath;
  /**
   * The connection, for a successor to serve (libfuse 3 binding only): a new
   * dup of the /dev/fuse descriptor, which the caller owns and closes, and the
   * negotiated INIT. Throws (code STATE) until the kernel's INIT is answered
   * and after the connection has ended.
   */
  connection?(): { fd: number; init: FuseInit };
  /** How FUSE passthrough went (libfuse 3 binding only); undefined until INIT is answered. */
  passthrough?(): PassthroughInfo | undefined;
  /** Lets go of the backing id (files opened with it keep it); 0 or an errno. */
  closeBacking?(): number;
}

/** The negative errno a thrown value answers with (EIO unless it carries one). */
export function toErrno(err: unknown): number {
  const n = (err as { errno?: unknown } | null)?.errno;
  if (typeof n === 'number' && n !== 0) return -Math.abs(n);
  return -Errno.EIO;
}

/**
 * umount2 through the native helper, in libuv's thread pool (the kernel's
 * wait for the mount to retire does not hold the event loop, and several
 * unmounts overlap): 0 or -errno; undefined when the helper is not built.
 */
async function unmountNative(mountpoint: string): Promise<number | undefined> {
  let helper: ReturnType<typeof nativeHelper>;
  try {
    helper = nativeHelper();
  } catch {
    return undefined;
  }
  return helper.lazyUnmountAsync(mountpoint);
}

/** Lazily unmounts a FUSE mount (umount2 with MNT_DETACH as root, fusermount -uz otherwise). */
export async function lazyUnmount(mountpoint: string): Promise<void> {
  mountTableChanging();
  const asRoot = process.getuid?.() === 0;
  // As root, the system call itself: a `umount -l` child costs a fork of the whole agent (0.2–0.35 s
  // each with hundreds of exports), and stopping an agent unmounts every export.
  const native = asRoot ? await unmountNative(mountpoint) : undefined;
  if (native === 0) return;
  if (native !== undefined && native !== -Errno.ENOSYS) {
    const name = Object.entries(constants.errno).find(([, v]) => v === -native)?.[0] ?? `errno ${-native}`;
    const why = native === -Errno.EINVAL ? 'not mounted' : name;
    throw new BlkError('MOUNT_FAILED', `umount2 ${mountpoint} (lazy): ${why}`);
  }
  const [cmd, args] = asRoot ? ['umount', ['-l', mountpoint]] : ['fusermount', ['-uz', mountpoint]];
  return new Promise((resolve, reject) => {
    execFile(cmd, args, (err, _stdout, stderr) => {
      if (err)
        reject(new BlkError('MOUNT_FAILED', `${cmd} ${args.join(' ')}: ${stderr.trim() || err.message}`));
      else resolve();
    });
  });
}

/** Remounts a FUSE mount read-write or read-only (-i: no mount.fuse helper for our subtype). */
export function remount(mountpoint: string, mode: 'rw' | 'ro'): Promise<void> {
  mountTableChanging();
  return new Promise((resolve, reject) => {
    execFile('mount', ['-i', '-o', `remount,${mode}`, mountpoint], (err, _out, stderr) => {
      if (err)
        reject(
          new BlkError(
            'MOUNT_FAILED',
            `remount ${mode} of '${mountpoint}' failed: ${stderr.trim() || err.message}`,
          ),
        );
      else resolve();
    });
  });
}
