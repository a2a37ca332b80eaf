/**
 * The fuse-native (libfuse 2) binding, the portable fallback when our own
 * libfuse 3 addon is not built. The only file that knows fuse-native. It mounts a filesystem whose root node
 * is one regular file, on a regular file, and turns our promise-returning
 * operations into fuse-native callbacks that are answered exactly once.
 *
 * fuse-native's own mount refuses a non-directory mountpoint and cannot pass
 * `nonempty`; we call its native binding the way its `_open` does, with our
 * own option string (docs/decisions/0001-own-libfuse3-binding.md). Per-op timeouts are off: a late answer
 * to a timed-out read would write into memory libfuse already freed.
 */
import { createRequire } from 'node:module';
import { dirname } from 'node:path';
import { BlkError, Errno } from '../../errors.js';
import { type FileFsMount, type FileFsOps, lazyUnmount, type MountOptions, toErrno } from './file-fs.js';

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
  for (const x of opts) if (/[, ]/.test(x)) throw new BlkError('USAGE', `invalid FUSE option '${x}'`);
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

/**
 * Mounts `ops` as a one-file filesystem on the regular file `mountpoint` (absolute).
 * Resolves when the kernel has sent FUSE INIT. Never touch the mount from this
 * process afterwards: check it from a child process.
 */
export function mountFileFsFuseNative(
  mountpoint: string,
  ops: FileFsOps,
  options: MountOptions,
): Promise<FileFsMount> {
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
      reject(
        new BlkError(
          'MOUNT_FAILED',
          `FUSE mount on '${mountpoint}' failed (${(e as Error).message}; options ${opts})`,
        ),
      );
    }
  });
}
