/**
 * The only file that knows fuse-native. It mounts a filesystem whose root node
 * is one regular file, on a regular file, and turns our promise-returning
 * operations into fuse-native callbacks that are answered exactly once.
 *
 * fuse-native's own mount refuses a non-directory mountpoint and cannot pass
 * `nonempty`; we call its native binding the way its `_open` does, with our
 * own option string (REFERENCE.md §F). Per-op timeouts are off: a late answer
 * to a timed-out read would write into memory libfuse already freed.
 */
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname } from 'node:path';

const require = createRequire(import.meta.url);

interface FuseNativeInstance {
  mnt: string;
  _thread: Buffer | null;
  _openCallback: ((err: Error | null) => void) | null;
  _malloc: (size: number) => Buffer;
  _handlers: unknown[];
  _getImplementedArray(): Uint32Array;
  _fuseOptions(): string;
  open(cb: (err: Error | null) => void): void;
  close(cb: (err: Error | null) => void): void;
}
type FuseNativeCtor = new (
  mnt: string,
  ops: Record<string, unknown>,
  opts: Record<string, unknown>,
) => FuseNativeInstance;

const FuseNative = require('fuse-native') as FuseNativeCtor;
const binding = require('node-gyp-build')(dirname(require.resolve('fuse-native/package.json'))) as {
  fuse_native_mount(
    mnt: string,
    opts: string,
    thread: Buffer,
    self: unknown,
    malloc: unknown,
    handlers: unknown,
    implemented: Uint32Array,
  ): void;
  fuse_native_unmount(mnt: string, thread: Buffer): void;
  sizeof_fuse_thread_t: number;
};

/** Linux errno values we answer with (positive; negated for FUSE). */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  EBADF: 9,
  EACCES: 13,
  EBUSY: 16,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ENOSYS: 38,
  EOPNOTSUPP: 95,
  ENOTCONN: 107,
} as const;

/** An error that answers a FUSE request with a specific errno. */
export class FuseErrno extends Error {
  constructor(
    readonly errno: number,
    message = `errno ${errno}`,
  ) {
    super(message);
    this.name = 'FuseErrno';
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

/** What a single-file FUSE filesystem implements. Throw FuseErrno (or anything with a numeric `errno`) to fail. */
export interface FileFsOps {
  getattr(): Promise<FileAttr>;
  open(flags: number): void;
  read(buf: Buffer, length: number, position: number): Promise<number>;
  write(buf: Buffer, length: number, position: number): Promise<number>;
  truncate(size: number): Promise<void>;
  chmod(mode: number): void;
  chown(uid: number, gid: number): void;
  utimens(): void;
  flush(): Promise<void>;
  fsync(): Promise<void>;
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
}

/** A mounted single-file filesystem. */
export interface FileFsMount {
  readonly mountpoint: string;
  /** Lazily unmounts; requests on descriptors still open are answered by `ops` until they close. */
  unmount(): Promise<void>;
}

function toErrno(err: unknown): number {
  const n = (err as { errno?: unknown } | null)?.errno;
  if (typeof n === 'number' && n !== 0) return -Math.abs(n);
  return -Errno.EIO;
}

function optionString(o: MountOptions): string {
  const opts = [
    `fsname=${o.fsname}`,
    `subtype=${o.subtype}`,
    'nonempty',
    'default_permissions',
    'big_writes',
    `max_read=${o.maxRead}`,
    `max_write=${o.maxRead}`,
    'attr_timeout=1',
    'entry_timeout=1',
  ];
  if (o.readOnly) opts.push('ro');
  if (o.allowOther) opts.push('allow_other');
  for (const x of opts) if (/[, ]/.test(x)) throw new Error(`invalid FUSE option '${x}'`);
  return `-o${opts.join(',')}`;
}

/** Builds fuse-native's callback-style ops over ours; each callback is answered exactly once, errors become errnos. */
function nativeOps(ops: FileFsOps): Record<string, unknown> {
  const fail = (op: string, err: unknown): number => {
    const errno = toErrno(err);
    if (errno === -Errno.EIO) ops.onError?.(op, err);
    return errno;
  };
  const isRoot = (path: string) => path === '/';
  type Cb = (err: number, ...rest: unknown[]) => void;
  const attr = (path: string, cb: Cb) => {
    if (!isRoot(path)) return cb(-Errno.ENOENT);
    ops.getattr().then(
      (a) => cb(0, a),
      (e) => cb(fail('getattr', e)),
    );
  };
  const sync = (op: string, fn: () => void, cb: Cb) => {
    try {
      fn();
      cb(0);
    } catch (e) {
      cb(fail(op, e));
    }
  };
  const async = (op: string, fn: () => Promise<void>, cb: Cb) => {
    let p: Promise<void>;
    try {
      p = fn();
    } catch (e) {
      return cb(fail(op, e));
    }
    p.then(
      () => cb(0),
      (e) => cb(fail(op, e)),
    );
  };
  return {
    getattr: attr,
    fgetattr: (path: string, _fd: number, cb: Cb) => attr(path, cb),
    statfs: (_path: string, cb: Cb) =>
      cb(0, {
        bsize: 512,
        frsize: 512,
        blocks: 0,
        bfree: 0,
        bavail: 0,
        files: 1,
        ffree: 0,
        favail: 0,
        namemax: 255,
      }),
    open: (path: string, flags: number, cb: Cb) => {
      if (!isRoot(path)) return cb(-Errno.ENOENT);
      try {
        ops.open(flags);
        cb(0, 0);
      } catch (e) {
        cb(fail('open', e));
      }
    },
    release: (_path: string, _fd: number, cb: Cb) => cb(0),
    read: (_path: string, _fd: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => {
      let p: Promise<number>;
      try {
        p = ops.read(buf, len, pos);
      } catch (e) {
        return cb(fail('read', e));
      }
      p.then(cb, (e) => cb(fail('read', e)));
    },
    write: (_path: string, _fd: number, buf: Buffer, len: number, pos: number, cb: (n: number) => void) => {
      let p: Promise<number>;
      try {
        p = ops.write(buf, len, pos);
      } catch (e) {
        return cb(fail('write', e));
      }
      p.then(cb, (e) => cb(fail('write', e)));
    },
    truncate: (_path: string, size: number, cb: Cb) => async('truncate', () => ops.truncate(size), cb),
    ftruncate: (_path: string, _fd: number, size: number, cb: Cb) =>
      async('truncate', () => ops.truncate(size), cb),
    chmod: (_path: string, mode: number, cb: Cb) => sync('chmod', () => ops.chmod(mode), cb),
    chown: (_path: string, uid: number, gid: number, cb: Cb) => sync('chown', () => ops.chown(uid, gid), cb),
    utimens: (_path: string, _a: number, _m: number, cb: Cb) => sync('utimens', () => ops.utimens(), cb),
    flush: (_path: string, _fd: number, cb: Cb) => async('flush', () => ops.flush(), cb),
    fsync: (_path: string, _datasync: boolean, _fd: number, cb: Cb) => async('fsync', () => ops.fsync(), cb),
    // The root node is the file itself: nothing to create, rename or remove inside it.
    unlink: (_p: string, cb: Cb) => cb(-Errno.EBUSY),
    rename: (_s: string, _d: string, cb: Cb) => cb(-Errno.EBUSY),
  };
}

/** Lazily unmounts a FUSE mount (umount -l as root, fusermount -uz otherwise). */
export function lazyUnmount(mountpoint: string): Promise<void> {
  const asRoot = process.getuid?.() === 0;
  const [cmd, args] = asRoot ? ['umount', ['-l', mountpoint]] : ['fusermount', ['-uz', mountpoint]];
  return new Promise((resolve, reject) => {
    execFile(cmd, args, (err, _stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')}: ${stderr.trim() || err.message}`));
      else resolve();
    });
  });
}

/**
 * Mounts `ops` as a one-file filesystem on the regular file `mountpoint` (absolute).
 * Resolves when the kernel has sent FUSE INIT. Never touch the mount from this
 * process afterwards: check it from a child process.
 */
export function mountFileFs(mountpoint: string, ops: FileFsOps, options: MountOptions): Promise<FileFsMount> {
  const fuse = new FuseNative(mountpoint, nativeOps(ops), { timeout: false });
  const opts = optionString(options);
  return new Promise((resolve, reject) => {
    const thread = Buffer.alloc(binding.sizeof_fuse_thread_t);
    fuse._thread = thread;
    fuse._openCallback = (err) => {
      if (err) return reject(err);
      let unmounted = false;
      resolve({
        mountpoint,
        async unmount() {
          if (unmounted) return;
          await lazyUnmount(mountpoint);
          unmounted = true;
          // Lets the event loop exit; the FUSE thread ends when the kernel connection goes away.
          binding.fuse_native_unmount(mountpoint, thread);
        },
      });
    };
    try {
      binding.fuse_native_mount(
        mountpoint,
        opts,
        thread,
        fuse,
        fuse._malloc,
        fuse._handlers,
        fuse._getImplementedArray(),
      );
    } catch (e) {
      fuse._openCallback = null;
      reject(new Error(`FUSE mount on '${mountpoint}' failed (${(e as Error).message}; options ${opts})`));
    }
  });
}
