/**
 * Our own FUSE binding (native-fuse/, its parts listed in blk_fs.h): its own
 * request loop on the kernel protocol, libfuse 3 for mounting only. 1 MiB
 * requests, asynchronous direct I/O, fallocate, requests answered from
 * JavaScript whenever they are done, never holding a thread; and a connection
 * can be handed to a successor process (connection() / adoptFileFsFuse3). The
 * addon is built at install from Debian's libfuse3-dev; without it, mount.ts
 * falls back to fuse-native.
 */
import { createRequire } from 'node:module';
import type { CompressionAlgorithm, HostExtent } from '../../block/types.js';
import { BlkError, Errno } from '../../errors.js';
import { mountTableChanging } from '../mount-table.js';
import {
  type FastPath,
  type FileFsMount,
  type FileFsOps,
  type FuseInit,
  lazyUnmount,
  type MountOptions,
  type PassthroughInfo,
  toErrno,
} from './file-fs.js';

/**
 * The request kinds dispatch() receives. Their numbers are defined once, in
 * native-fuse/blk_fs.h (BLK_OPS), and read from the addon's `ops` when it loads.
 */
const OP_NAMES = [
  'GETATTR',
  'SETATTR',
  'OPEN',
  'READ',
  'WRITE',
  'FLUSH',
  'FSYNC',
  'FALLOCATE',
  'LSEEK',
  'ENDED',
] as const;
type OpName = (typeof OP_NAMES)[number];
type OpCodes = Readonly<Record<OpName, number>>;

type ReqHandle = object;
/** dispatch(op, req, a, b, c, d, e, buf): one request from the binding (see napi_requests.c for the arguments). */
type Dispatch = (
  op: number,
  req: ReqHandle,
  a: number,
  b: number,
  c: number,
  d: number,
  e: number,
  buf?: Buffer,
) => void;
interface Fuse3Addon {
  /** The op codes, frozen: { GETATTR: 1, ... }. */
  readonly ops: OpCodes;
  mount(mountpoint: string, options: string, dispatch: Dispatch, extra?: { passthroughFd?: number }): object;
  /** Serves a connection another process negotiated; takes fd over when it returns. */
  adopt(fd: number, init: FuseInit, dispatch: Dispatch, options: { resend: boolean }): object;
  /** A new dup of the /dev/fuse descriptor (the caller's) and the negotiated INIT. */
  connection(handle: object): { fd: number; init: FuseInit };
  replyErr(req: ReqHandle, errno: number): void;
  replyAttr(
    req: ReqHandle,
    mode: number,
    uid: number,
    gid: number,
    size: number,
    blocks: number,
    timeout: number,
  ): void;
  /** backingId > 0: FOPEN_PASSTHROUGH with that backing id. */
  replyOpen(req: ReqHandle, directIo: boolean, keepCache: boolean, backingId: number): void;
  replyData(req: ReqHandle, n: number): void;
  replyWrite(req: ReqHandle, n: number): void;
  replyLseek(req: ReqHandle, offset: number): void;
  unref(handle: object): void;
  fastGen(handle: object): number;
  fastInvalidate(handle: object, offset: number, length: number, size: number, wait?: boolean): void;
  fastEnable(handle: object, on: boolean): void;
  fastInstall(
    handle: object,
    gen: number,
    offset: number,
    extents: Float64Array,
    writable?: Uint8Array,
  ): void;
  fastAllowWrites(handle: object, on: boolean): void;
  fastStats(handle: object): [number, number, number, number];
  /**
   * Records of [offset, length, fd, host, clen, clusterBits, skip, algorithm (ALGORITHM_CODES)],
   * each a guest range inside one compressed cluster.
   */
  fastInstallCompressed(handle: object, gen: number, records: Float64Array): void;
  /** The process's native inflation counters and decompressed-cluster cache. */
  inflateStats(): InflateStats;
  /** The workers' decoder on this thread: one cluster, or null where it refuses (JavaScript decides). */
  inflateCluster(
    fd: number,
    host: number,
    clen: number,
    clusterBits: number,
    algorithm: number,
  ): Buffer | null;
  /** undefined until INIT is answered (native-fuse/passthrough.c). */
  passthrough(handle: object): PassthroughInfo | undefined;
  backingClose(handle: object): number;
}

/** The binding's codes for compression algorithms (INFLATE_* in native-fuse/inflate.h). */
export const ALGORITHM_CODES: Readonly<Record<CompressionAlgorithm, number>> = {
  zlib: 0,
  zstd: 1,
  'zlib-wrapped': 2,
  'vmdk-marker': 3,
};

/** Compressed clusters inflated by the binding's workers, process-wide (native-fuse/inflate.h). */
export interface InflateStats {
  /** 0 when BLKEXPORT_NATIVE_INFLATE=0: compressed reads all go to JavaScript. */
  enabled: number;
  inflated: number;
  cacheHits: number;
  /** Clusters that did not inflate in C (served, or reported corrupt, by JavaScript). */
  failed: number;
  cacheBytes: number;
  cacheLimit: number;
  cacheEntries: number;
}

const ADDON_PATH = new URL('../../../native-fuse/build/Release/blkexport_fuse3.node', import.meta.url)
  .pathname;

let addon: Fuse3Addon | null | undefined;
let loadError = '';

/** The libfuse 3 addon, or null when it is not built here (with the reason in fuse3Unavailable()). */
export function loadFuse3(): Fuse3Addon | null {
  if (addon === undefined) {
    try {
      const a = createRequire(import.meta.url)(ADDON_PATH) as Partial<Fuse3Addon>;
      const missing = OP_NAMES.filter((n) => !Number.isInteger(a.ops?.[n]));
      if (missing.length > 0)
        throw new BlkError(
          'INTERNAL',
          `${ADDON_PATH} has no op code for ${missing.join(', ')} (rebuild it: npm run build:native)`,
        );
      // A build from before the binding had its own loop lacks these.
      const lacking = (['adopt', 'connection', 'passthrough'] as const).filter(
        (f) => typeof a[f] !== 'function',
      );
      if (lacking.length > 0)
        throw new BlkError(
          'INTERNAL',
          `${ADDON_PATH} has no ${lacking.join(', ')} (rebuild it: npm run build:native)`,
        );
      addon = a as Fuse3Addon;
    } catch (e) {
      addon = null;
      loadError = (e as Error).message.split('\n')[0] ?? String(e);
    }
  }
  return addon;
}

/** Why the libfuse 3 binding cannot be used ('' when it can). */
export function fuse3Unavailable(): string {
  return loadFuse3() ? '' : loadError;
}

// struct fuse_setattr flags (fuse_lowlevel.h)
const SET = {
  MODE: 1 << 0,
  UID: 1 << 1,
  GID: 1 << 2,
  SIZE: 1 << 3,
  ATIME: 1 << 4,
  MTIME: 1 << 5,
  ATIME_NOW: 1 << 7,
  MTIME_NOW: 1 << 8,
};
const ATTR_TIMEOUT_S = 1;

function optionString(o: MountOptions): string {
  // libfuse 3 mounts on a non-empty regular file without `nonempty`, and always allows big writes.
  const opts = [`fsname=${o.fsname}`, `subtype=${o.subtype}`, 'default_permissions'];
  if (o.readOnly) opts.push('ro');
  if (o.allowOther) opts.push('allow_other');
  for (const x of opts) if (/[, ]/.test(x)) throw new BlkError('USAGE', `invalid FUSE option '${x}'`);
  return opts.join(',');
}

/** Mounts `ops` as a one-file filesystem on the regular file `mountpoint` through libfuse 3. */
export function mountFileFsFuse3(
  mountpoint: string,
  ops: FileFsOps,
  options: MountOptions,
): Promise<FileFsMount> {
  const a = loadFuse3();
  if (!a)
    return Promise.reject(new BlkError('MOUNT_FAILED', `the libfuse 3 binding is not built: ${loadError}`));
  return serve(a, mountpoint, ops, (dispatch) => {
    try {
      const extra = options.passthroughFd === undefined ? {} : { passthroughFd: options.passthroughFd };
      mountTableChanging();
      return a.mount(mountpoint, optionString(options), dispatch, extra);
    } catch (e) {
      throw new BlkError('MOUNT_FAILED', `FUSE mount on '${mountpoint}' failed (${(e as Error).message})`);
    }
  });
}

export interface AdoptOptions {
  /** Where the connection is mounted (for unmount()). */
  mountpoint: string;
  /**
   * Ask the kernel first to resend every request the previous server read but
   * never answered (FUSE_NOTIFY_RESEND; needs init.resend). Only once that
   * server is gone: what it still reads afterwards is lost.
   */
  resend: boolean;
}

/**
 * Serves `ops` on a connection another process mounted and negotiated: `fd` is
 * a /dev/fuse descriptor that process kept (a `connection()` dup), `init` what
 * its `connection()` said. Takes `fd` over once it resolves; when it rejects,
 * `fd` is still the caller's. No INIT comes: the kernel sent it to the first server.
 */
export function adoptFileFsFuse3(
  fd: number,
  init: FuseInit,
  ops: FileFsOps,
  options: AdoptOptions,
): Promise<FileFsMount> {
  const a = loadFuse3();
  if (!a)
    return Promise.reject(new BlkError('MOUNT_FAILED', `the libfuse 3 binding is not built: ${loadError}`));
  return serve(a, options.mountpoint, ops, (dispatch) => {
    try {
      return a.adopt(fd, init, dispatch, { resend: options.resend });
    } catch (e) {
      throw new BlkError(
        'MOUNT_FAILED',
        `adopting the FUSE connection of '${options.mountpoint}' (fd ${fd}) failed (${(e as Error).message})`,
      );
    }
  });
}

/** Starts serving `ops` (start() mounts or adopts, with our dispatch) and wraps the handle as a FileFsMount. */
function serve(
  a: Fuse3Addon,
  mountpoint: string,
  ops: FileFsOps,
  start: (dispatch: Dispatch) => object,
): Promise<FileFsMount> {
  const OP = a.ops; // checked when the addon loaded; dispatch() compares against it
  let ended: () => void = () => undefined;
  const endedP = new Promise<void>((resolve) => {
    ended = resolve;
  });

  const fail = (req: ReqHandle, op: string, err: unknown) => {
    const errno = toErrno(err);
    if (errno === -Errno.EIO) ops.onError?.(op, err);
    a.replyErr(req, -errno);
  };
  const replyAttr = (req: ReqHandle) =>
    ops.getattr().then(
      (at) => a.replyAttr(req, at.mode, at.uid, at.gid, at.size, at.blocks, ATTR_TIMEOUT_S),
      (e) => fail(req, 'getattr', e),
    );
  const done = (req: ReqHandle, op: string, p: Promise<void>) =>
    p.then(
      () => a.replyErr(req, 0),
      (e) => fail(req, op, e),
    );

  const setattr = async (toSet: number, mode: number, uid: number, gid: number, size: number) => {
    if (toSet & (SET.ATIME | SET.MTIME | SET.ATIME_NOW | SET.MTIME_NOW)) ops.utimens();
    if (toSet & SET.MODE) ops.chmod(mode);
    if (toSet & (SET.UID | SET.GID)) ops.chown(toSet & SET.UID ? uid : -1, toSet & SET.GID ? gid : -1);
    if (toSet & SET.SIZE) await ops.truncate(size);
  };

  const dispatch: Dispatch = (op, req, x, y, z, w, v, buf) => {
    try {
      switch (op) {
        case OP.READ:
          ops.read(buf!, x, y).then(
            (n) => a.replyData(req, n),
            (e) => fail(req, 'read', e),
          );
          return;
        case OP.WRITE:
          ops.write(buf!, x, y).then(
            (n) => a.replyWrite(req, n),
            (e) => fail(req, 'write', e),
          );
          return;
        case OP.GETATTR:
          replyAttr(req);
          return;
        case OP.SETATTR:
          setattr(x, y, z, w, v).then(
            () => replyAttr(req),
            (e) => fail(req, 'setattr', e),
          );
          return;
        case OP.OPEN: {
          const answer = ops.open(x);
          a.replyOpen(req, answer?.directIo ?? false, false, answer?.backingId ?? 0);
          return;
        }
        case OP.FLUSH:
          done(req, 'flush', ops.flush());
          return;
        case OP.FSYNC:
          done(req, 'fsync', ops.fsync());
          return;
        case OP.FALLOCATE:
          if (!ops.fallocate) a.replyErr(req, Errno.EOPNOTSUPP);
          else done(req, 'fallocate', ops.fallocate(x, y, z));
          return;
        case OP.LSEEK:
          if (!ops.seek) a.replyErr(req, Errno.EOPNOTSUPP);
          else
            ops.seek(x, y).then(
              (off) => a.replyLseek(req, off),
              (e) => fail(req, 'lseek', e),
            );
          return;
        case OP.ENDED:
          ended();
          return;
        default:
          a.replyErr(req, Errno.ENOSYS);
      }
    } catch (e) {
      fail(req, `op ${op}`, e);
    }
  };

  let h: object;
  try {
    h = start(dispatch);
  } catch (e) {
    return Promise.reject(e);
  }
  let unmounted = false;
  const fast: FastPath = {
    gen: () => a.fastGen(h),
    install(gen, offset, extents: readonly HostExtent[]) {
      // Runs of plain pieces go as triples (with their writability), compressed pieces all in one call.
      let pos = offset;
      let run: number[] = [];
      let writable: number[] = [];
      let runAt = offset;
      const compressed: number[] = [];
      const flush = () => {
        if (run.length > 0) a.fastInstall(h, gen, runAt, Float64Array.from(run), Uint8Array.from(writable));
        run = [];
        writable = [];
      };
      for (const x of extents) {
        if ('compressed' in x) {
          flush();
          const c = x.compressed;
          const algorithm = ALGORITHM_CODES[c.algorithm];
          compressed.push(pos, x.length, c.fd, c.host, c.clen, Math.log2(c.clusterSize), c.skip, algorithm);
          runAt = pos + x.length;
        } else if ('zero' in x) {
          run.push(x.length, -1, 0);
          writable.push(0);
        } else {
          run.push(x.length, x.fd, x.host);
          writable.push(x.writable === true ? 1 : 0);
        }
        pos += x.length;
      }
      flush();
      if (compressed.length > 0) a.fastInstallCompressed(h, gen, Float64Array.from(compressed));
    },
    invalidate: (offset, length, size, wait) => a.fastInvalidate(h, offset, length, size ?? -1, wait ?? true),
    enable: (on) => a.fastEnable(h, on),
    allowWrites: (on) => a.fastAllowWrites(h, on),
    stats() {
      const [reads, bytes, writes, writeBytes] = a.fastStats(h);
      return { reads, bytes, writes, writeBytes };
    },
  };
  return Promise.resolve({
    mountpoint,
    ended: endedP,
    fast,
    connection() {
      try {
        return a.connection(h);
      } catch (e) {
        throw new BlkError(
          'STATE',
          `no FUSE connection to hand over on '${mountpoint}': ${(e as Error).message}`,
        );
      }
    },
    passthrough: () => a.passthrough(h),
    closeBacking: () => a.backingClose(h),
    async unmount() {
      if (unmounted) return;
      await lazyUnmount(mountpoint);
      unmounted = true;
      // Descriptors still open keep the connection (and our loop) alive; do not keep the process alive for them.
      a.unref(h);
    },
  });
}
