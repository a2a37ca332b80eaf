/**
 * The `file` protocol driver: one host file, one fd per node, positional
 * reads and writes straight into the caller's buffer (no per-request
 * allocation). Reopen swaps the fd through /proc/self/fd so it keeps reaching
 * the same file even when a FUSE mount now covers its name.
 */
import { closeSync, constants, fstatSync, openSync, readlinkSync } from 'node:fs';
import { resolve } from 'node:path';
import { BlkError } from '../../errors.js';
import { defineDriver, type OpenContext } from '../driver.js';
import { ImageLock, lockPermsFor, parseLockingMode } from '../lock.js';
import { isInsideRoot } from '../path-policy.js';
import { fdatasyncAsync, fstatAsync, ftruncateAsync, preadFull, pwriteFull } from './file-io.js';

interface FileState {
  fd: number;
  path: string;
  size: number;
  readOnly: boolean;
  /** dev:ino of the file, for backing-cycle detection. */
  key: string;
  /** fd opened by reopenPrepare, waiting for commit or abort. */
  pendingFd: number | undefined;
  /** QEMU-compatible image locks (absent with `locking: off`). */
  lock: ImageLock | undefined;
  /** force-share: a reader that refuses others nothing; never reopened writable. */
  forceShare: boolean;
}

function ioError(s: { path: string }, op: string, e: unknown): BlkError {
  const errno =
    typeof (e as { errno?: number }).errno === 'number' ? -(e as { errno: number }).errno : undefined;
  return new BlkError('IO', `${op} failed: ${(e as Error).message}`, { file: s.path }, { cause: e, errno });
}

function openFd(path: string, readOnly: boolean): number {
  return openSync(path, readOnly ? constants.O_RDONLY : constants.O_RDWR);
}

/** Opens the host file of a `file` node. */
async function openFile(ctx: OpenContext): Promise<FileState> {
  const name = ctx.options.filename;
  if (typeof name !== 'string' || name === '') {
    throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver file needs a filename`);
  }
  if (name.includes('\0')) throw new BlkError('IMAGE_INVALID', 'filename contains a NUL byte');
  const path = resolve(name);
  const forceShare = ctx.options.forceShare === true;
  if (forceShare && !ctx.readOnly) {
    throw new BlkError('USAGE', `node '${ctx.nodeName}': force-share is for read-only nodes (as in QEMU)`, {
      file: path,
    });
  }
  let fd: number;
  try {
    fd = openFd(path, ctx.readOnly);
  } catch (e) {
    throw ioError({ path }, `open(${ctx.readOnly ? 'read-only' : 'read-write'})`, e);
  }
  try {
    const confine = ctx.options.confineTo;
    if (confine !== undefined) {
      const real = readlinkSync(`/proc/self/fd/${fd}`);
      if (!confine.some((r) => isInsideRoot(real, r))) {
        throw new BlkError('BACKING_POLICY', `'${path}' now leads to ${real}, outside the allowed roots`, {
          file: path,
        });
      }
    }
    const st = await fstatAsync(fd);
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new BlkError('IMAGE_INVALID', `'${path}' is not a regular file or block device`, { file: path });
    }
    // Block devices report size 0 in st_size; ask by seeking is not available, so refuse them politely for now.
    if (st.isBlockDevice()) {
      throw new BlkError('NOT_SUPPORTED', `block devices are not supported yet: '${path}'`, { file: path });
    }
    const mode = parseLockingMode(ctx.options.locking, path);
    const lock = ImageLock.acquire(fd, path, mode, lockPermsFor(ctx.readOnly, forceShare));
    return {
      fd,
      path,
      size: st.size,
      readOnly: ctx.readOnly,
      key: `${st.dev}:${st.ino}`,
      pendingFd: undefined,
      lock,
      forceShare,
    };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

export const fileProtocol = defineDriver<FileState>({
  name: 'file',
  role: 'protocol',
  mutableOptions: ['read-only'],

  // --- open / close
  open: openFile,
  async close(s) {
    closeSync(s.fd);
    s.fd = -1;
    s.lock?.release();
  },

  // --- reopen: a new fd on the same open file, swapped in at commit
  // The locks move with the mode: prepare takes the new ones (and checks them), commit drops the old.
  async reopenPrepare(s, opts) {
    if (opts.readOnly === undefined || opts.readOnly === s.readOnly) return;
    if (s.forceShare && !opts.readOnly)
      throw new BlkError('USAGE', `'${s.path}': a force-share node stays read-only (as in QEMU)`, {
        file: s.path,
      });
    s.lock?.prepare(lockPermsFor(opts.readOnly));
    try {
      s.pendingFd = openFd(`/proc/self/fd/${s.fd}`, opts.readOnly);
    } catch (e) {
      s.lock?.abort();
      throw ioError(s, `reopen(${opts.readOnly ? 'read-only' : 'read-write'})`, e);
    }
  },
  reopenCommit(s, opts) {
    if (s.pendingFd === undefined || opts.readOnly === undefined) return;
    closeSync(s.fd);
    s.fd = s.pendingFd;
    s.pendingFd = undefined;
    s.readOnly = opts.readOnly;
    s.lock?.commit(lockPermsFor(opts.readOnly));
  },
  reopenAbort(s) {
    if (s.pendingFd !== undefined) {
      closeSync(s.pendingFd);
      s.lock?.abort();
    }
    s.pendingFd = undefined;
  },
  isReadOnly: (s) => s.readOnly,
  describe: (s) => ({ filename: s.path, fileKey: s.key }),

  // --- I/O
  length: (s) => s.size,
  // The whole file maps to itself: the FUSE fast path reads it directly, and writes it when opened read-write.
  mapHostCached: (s, offset, length) => [{ length, fd: s.fd, host: offset, writable: !s.readOnly }],
  async read(s, offset, buf) {
    try {
      await preadFull(s.fd, buf, 0, buf.length, offset);
    } catch (e) {
      throw ioError(s, `read at ${offset}`, e);
    }
  },
  async write(s, offset, buf) {
    try {
      await pwriteFull(s.fd, buf, 0, buf.length, offset);
    } catch (e) {
      throw ioError(s, `write at ${offset}`, e);
    }
  },
  async flush(s) {
    try {
      await fdatasyncAsync(s.fd);
    } catch (e) {
      throw ioError(s, 'fdatasync', e);
    }
  },
  async truncate(s, size) {
    try {
      await ftruncateAsync(s.fd, size);
      s.size = (await fstatAsync(s.fd)).size;
    } catch (e) {
      throw ioError(s, `truncate to ${size}`, e);
    }
  },
  refreshLength(s) {
    s.size = fstatSync(s.fd).size;
  },
  // Synchronous on purpose: a FUSE getattr of our own export asks for this, and it must not need a
  // libuv pool thread (the pool may be full of requests waiting on that very getattr).
  async allocatedSize(s) {
    return fstatSync(s.fd).blocks * 512;
  },
  capabilities: () => ({ discard: false }),
});
