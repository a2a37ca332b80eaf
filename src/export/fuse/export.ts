/**
 * A live FUSE export: one BlockNode presented as one raw file, with
 * qemu-storage-daemon's semantics (docs/fuse-export.md lists them) and
 * blkexport's stricter size rule (size changes need `growable`). It sees one
 * node, never the graph; generic checks (unique ids and mountpoints, writable
 * over a read-only node) live in the export core (../registry.ts).
 */
import { constants } from 'node:fs';
import type { BlockNode } from '../../block/types.js';
import { BlkError, describeError, Errno } from '../../errors.js';
import { type ExportStats, type LiveExport, newExportStats } from '../driver.js';
import { FastPathSync } from './fast-sync.js';
import {
  type FileAttr,
  type FileFsMount,
  type FileFsOps,
  FuseErrno,
  type FuseInit,
  type OpenAnswer,
  remount,
} from './file-fs.js';
import { adoptFileFs, mountFileFs } from './mount.js';
import {
  describePassthrough,
  identityFile,
  type PassthroughStatus,
  passthroughRefused,
} from './passthrough.js';
import { roundUpToSector, seekDataOrHole } from './seek.js';

export type AllowOther = 'auto' | 'on' | 'off';

export interface FuseExportOptions {
  id: string;
  /** Absolute path of an existing regular file. */
  mountpoint: string;
  writable: boolean;
  growable: boolean;
  allowOther: AllowOther;
  /** fsname that marks the mount as ours in /proc/mounts. */
  fsname: string;
}

const O_ACCMODE = 3;
/** A length that covers any export: invalidates everything. */
const ALL = Number.MAX_SAFE_INTEGER;
/** fallocate(2) mode bits. */
const FALLOC = { KEEP_SIZE: 0x01, PUNCH_HOLE: 0x02, ZERO_RANGE: 0x10 } as const;

/** Largest request libfuse 2 hands us; also what we ask for with max_read/max_write. */
const MAX_REQUEST = 128 * 1024;
/** How long start() waits for the kernel's INIT to learn whether passthrough was granted. */
const INIT_WAIT_MS = 5000;

export class FuseExport implements LiveExport<FuseExportOptions> {
  readonly type = 'fuse';
  readonly id: string;
  readonly mountpoint: string;
  readonly node: BlockNode;
  private readonly jsStats: ExportStats = newExportStats();
  /** Called with every failure answered as EIO (logs). */
  onError: ((op: string, err: unknown) => void) | undefined;

  private writable: boolean;
  private growable: boolean;
  private allowOther = false;
  private mountAllowsOther = false;
  /** The binding's read fast path, kept exact around every change (a no-op without one). */
  private fast: FastPathSync;
  private mode: number;
  private uid = process.getuid?.() ?? 0;
  private gid = process.getgid?.() ?? 0;
  private closed = false;
  private mount: FileFsMount | undefined;
  /** Serializes size changes (growing writes and truncates). */
  private resizing: Promise<void> = Promise.resolve();
  /** FUSE passthrough: whether this mount has it (decided at mount, for the mount's life). */
  private pt: PassthroughStatus = { active: false, why: 'options', reason: 'not mounted' };

  private constructor(node: BlockNode, opts: FuseExportOptions) {
    this.id = opts.id;
    this.mountpoint = opts.mountpoint;
    this.node = node;
    this.writable = opts.writable;
    this.growable = opts.growable;
    this.mode = opts.writable ? 0o600 : 0o400;
    this.fast = new FastPathSync(node, undefined);
  }

  /**
   * Mounts `node` on opts.mountpoint. The mount carries allow_other whenever
   * the kernel grants it (and must for `on`); `allow-other` itself is enforced
   * through the mode bits (default_permissions), so it can change in place.
   */
  static async start(node: BlockNode, opts: FuseExportOptions): Promise<FuseExport> {
    const exp = new FuseExport(node, opts);
    const file = identityFile(node);
    const optsRefused =
      passthroughRefused(opts) ??
      // A raw node with offset/size never follows its file: a passthrough write past the end would.
      (opts.writable && !node.capabilities().truncate
        ? 'the raw node cannot change size (offset/size)'
        : undefined);
    const refused: PassthroughStatus | undefined =
      'reason' in file
        ? { active: false, why: 'node', reason: file.reason }
        : optsRefused !== undefined
          ? { active: false, why: 'options', reason: optsRefused }
          : undefined;
    const passthroughFd = refused === undefined && 'fd' in file ? file.fd : undefined;
    const attempt = (allowOther: boolean) =>
      mountFileFs(opts.mountpoint, exp.ops(), {
        readOnly: !opts.writable,
        allowOther,
        fsname: opts.fsname,
        subtype: 'blkexport',
        maxRead: MAX_REQUEST,
        passthroughFd,
      });
    try {
      exp.mount = await attempt(true);
      exp.mountAllowsOther = true;
    } catch (e) {
      if (opts.allowOther === 'on') throw e;
      exp.mount = await attempt(false);
    }
    exp.allowOther = opts.allowOther === 'on' || (opts.allowOther === 'auto' && exp.mountAllowsOther);
    exp.fast = new FastPathSync(node, exp.mount.fast);
    exp.fast.reset();
    exp.pt = refused ?? (await settlePassthrough(exp.mount));
    exp.fast.allowWrites(opts.writable);
    return exp;
  }

  /**
   * Serves a mount another process made and kept (its connection `fd` and
   * INIT parameters): the mount stays as it is (its rw/ro state and whether
   * the kernel granted allow_other are taken as they were, `opts` as the
   * options it was made with); pending requests are asked again (resend).
   */
  static async adopt(
    node: BlockNode,
    opts: FuseExportOptions,
    held: { fd: number; init: FuseInit; allowsOther: boolean; resend: boolean },
  ): Promise<FuseExport> {
    const exp = new FuseExport(node, opts);
    exp.mount = await adoptFileFs(opts.mountpoint, held.fd, held.init, exp.ops(), held.resend);
    exp.mountAllowsOther = held.allowsOther;
    exp.allowOther = opts.allowOther === 'on' || (opts.allowOther === 'auto' && held.allowsOther);
    exp.fast = new FastPathSync(node, exp.mount.fast);
    exp.fast.reset();
    // The first server's backing id: files it opened in passthrough hold it, later opens must use it too.
    const id = held.init.backingId ?? 0;
    exp.pt =
      id > 0
        ? { active: true, backingId: id }
        : { active: false, why: 'options', reason: 'the kept mount was made without passthrough' };
    exp.fast.allowWrites(opts.writable);
    return exp;
  }

  /** Whether the kernel serves this export's reads and writes itself (FUSE passthrough), or why not. */
  get passthrough(): PassthroughStatus {
    return this.pt;
  }

  /** The kernel connection, for keeping it outside this process (undefined: the binding cannot hand it over). */
  connection(): { fd: number; init: FuseInit; allowsOther: boolean } | undefined {
    const c = this.mount?.connection?.();
    return c && { ...c, allowsOther: this.mountAllowsOther };
  }

  /**
   * The export core says whether another export shares a node with this one
   * while either can write: then the fast path is off, because this export
   * would not see the other's changes to invalidate them.
   */
  setShared(shared: boolean): void {
    if (!this.closed) this.fast.enable(!shared);
  }

  /** Applies writable, growable and allow-other in place. */
  async reopen(opts: FuseExportOptions): Promise<void> {
    await this.setWritable(opts.writable);
    this.setGrowable(opts.growable);
    this.setAllowOther(opts.allowOther);
  }

  /**
   * Counters, including the reads and writes the binding served itself. With
   * passthrough, I/O the kernel does on the image file is not counted
   * (`passthrough: true` says so).
   */
  get stats(): ExportStats {
    const fast = this.fast.stats();
    const passthrough = this.pt.active ? { passthrough: true } : {};
    if (!fast) return { ...this.jsStats, ...passthrough };
    return {
      ...this.jsStats,
      ...passthrough,
      reads: this.jsStats.reads + fast.reads,
      readBytes: this.jsStats.readBytes + fast.bytes,
      writes: this.jsStats.writes + fast.writes,
      writeBytes: this.jsStats.writeBytes + fast.writeBytes,
    };
  }

  /** What the binding served without JavaScript (undefined: a binding without a fast path). */
  get nativeStats(): { reads: number; bytes: number; writes: number; writeBytes: number } | undefined {
    return this.fast.stats();
  }

  get isWritable(): boolean {
    return this.writable;
  }

  get isGrowable(): boolean {
    return this.growable;
  }

  /** Changes growable in place. */
  setGrowable(growable: boolean): void {
    this.growable = growable;
  }

  /** Changes allow-other in place; turning it off drops group/other permission bits. */
  setAllowOther(value: AllowOther): void {
    if (value === 'on' && !this.mountAllowsOther) {
      throw new BlkError(
        'NOT_SUPPORTED',
        `export '${this.id}': the kernel refused allow_other for this mount`,
      );
    }
    this.allowOther = value === 'on' || (value === 'auto' && this.mountAllowsOther);
    if (!this.allowOther) this.mode &= 0o700;
  }

  /**
   * Changes writable in place: remounts rw/ro (open descriptors stay valid).
   * Going read-only flushes first; if the kernel keeps the mount rw because a
   * descriptor is open for writing, writes are still refused by the export.
   */
  async setWritable(writable: boolean): Promise<void> {
    if (writable === this.writable) return;
    if (!writable) {
      // Native writes stop (and those in flight land) before the flush that must cover them.
      this.fast.allowWrites(false);
      await this.node.flush();
      this.writable = false;
      this.mode &= ~0o222;
      await remount(this.mountpoint, 'ro').catch(() => undefined);
    } else {
      await remount(this.mountpoint, 'rw');
      this.writable = true;
      this.mode |= 0o200;
      this.fast.allowWrites(true);
    }
  }

  /** Flushes the node (when writable), unmounts lazily; later requests on open descriptors get ENOTCONN. */
  async stop(): Promise<void> {
    if (this.closed) return;
    this.fast.allowWrites(false);
    this.fast.enable(false);
    if (this.writable) await this.node.flush();
    // Files still open in passthrough keep their own reference to the image file.
    if (this.pt.active) this.mount?.closeBacking?.();
    await this.mount?.unmount();
    this.closed = true;
  }

  /**
   * With passthrough, the kernel's writes past the end of a growable export
   * grow the image file behind the node: ops that depend on the size re-read
   * it first (one fstat).
   */
  private syncLength(): void {
    if (!this.pt.active || !this.node.refreshLength) return;
    const before = this.node.length();
    this.node.refreshLength();
    if (this.node.length() !== before) this.fast.reset();
  }

  private check(): void {
    if (this.closed) throw new FuseErrno(Errno.ENOTCONN, 'export removed');
  }

  private async resize(size: number): Promise<void> {
    const run = this.resizing.then(() =>
      size > this.node.length() ? this.fast.changing(0, ALL, () => this.node.truncate(size)) : undefined,
    );
    this.resizing = run.catch(() => undefined);
    await run;
  }

  private ops(): FileFsOps {
    const node = this.node;
    return {
      getattr: async (): Promise<FileAttr> => {
        this.check();
        this.syncLength();
        const now = new Date();
        const allocated = await node.allocatedSize().catch(() => 0);
        return {
          mode: constants.S_IFREG | this.mode,
          uid: this.uid,
          gid: this.gid,
          size: roundUpToSector(node.length()),
          blocks: Math.ceil(allocated / 512),
          mtime: now,
          atime: now,
          ctime: now,
        };
      },
      open: (flags): OpenAnswer | undefined => {
        this.check();
        const writing = (flags & O_ACCMODE) !== constants.O_RDONLY;
        if (!this.writable && writing) {
          throw new FuseErrno(Errno.EACCES, 'export is read-only');
        }
        if (!this.pt.active) return undefined;
        // Once a mount has passthrough every open must use it (the kernel refuses a mix). A writer
        // of an export that became non-growable since the mount gets its reads and writes sent to
        // us (direct I/O), so the size rule holds for it.
        if (writing && !this.growable) return { backingId: this.pt.backingId, directIo: true };
        return { backingId: this.pt.backingId };
      },
      read: async (buf, length, position) => {
        this.check();
        const size = node.length();
        if (position >= size) return 0;
        const n = Math.min(length, size - position);
        const t0 = performance.now();
        const gen = this.fast.gen();
        await node.read(position, n === buf.length ? buf : buf.subarray(0, n));
        if (gen >= 0) this.fast.learn(gen, position, n);
        this.jsStats.readLatency.observe((performance.now() - t0) / 1000);
        this.jsStats.reads++;
        this.jsStats.readBytes += n;
        return n;
      },
      write: async (buf, length, position) => {
        this.check();
        if (!this.writable) throw new FuseErrno(Errno.EACCES, 'export is read-only');
        let n = length;
        const end = position + length;
        if (end > node.length()) {
          if (this.growable) {
            await this.resize(end);
          } else if (position >= node.length()) {
            throw new FuseErrno(Errno.ENOSPC, 'write past the end of a non-growable export');
          } else {
            n = node.length() - position; // short write up to EOF, as QSD
          }
        }
        const t0 = performance.now();
        await this.fast.writing(position, n, () =>
          node.write(position, n === buf.length ? buf : buf.subarray(0, n)),
        );
        this.jsStats.writeLatency.observe((performance.now() - t0) / 1000);
        this.jsStats.writes++;
        this.jsStats.writeBytes += n;
        return n;
      },
      truncate: async (size) => {
        this.check();
        this.syncLength();
        if (!this.writable) throw new FuseErrno(Errno.EACCES, 'export is read-only');
        if (size === node.length()) return;
        // Stricter than QSD on purpose: a stray `truncate -s 0` must not destroy a disk.
        if (!this.growable) throw new FuseErrno(Errno.EPERM, 'size changes need a growable export');
        const run = this.resizing.then(() => this.fast.changing(0, ALL, () => node.truncate(size)));
        this.resizing = run.catch(() => undefined);
        await run;
      },
      chmod: (mode) => {
        this.check();
        const perms = mode & 0o777;
        if ((mode & constants.S_IFMT) !== 0 && (mode & constants.S_IFMT) !== constants.S_IFREG) {
          throw new FuseErrno(Errno.EINVAL);
        }
        if (!this.allowOther && (perms & 0o077) !== 0) throw new FuseErrno(Errno.EPERM);
        if (!this.writable && (perms & 0o222) !== 0) throw new FuseErrno(Errno.EROFS);
        this.mode = perms;
      },
      chown: (uid, gid) => {
        this.check();
        const keep = 0xffffffff;
        const newUid = uid === keep || uid === -1 ? this.uid : uid;
        const newGid = gid === keep || gid === -1 ? this.gid : gid;
        if ((newUid !== this.uid || newGid !== this.gid) && !this.allowOther)
          throw new FuseErrno(Errno.EPERM);
        this.uid = newUid;
        this.gid = newGid;
      },
      fallocate: async (mode, offset, length) => {
        this.check();
        this.syncLength();
        if (!this.writable) throw new FuseErrno(Errno.EACCES, 'export is read-only');
        const size = node.length();
        const keepSize = (mode & FALLOC.KEEP_SIZE) !== 0;
        const end = offset + length;
        if (mode === 0 || mode === FALLOC.ZERO_RANGE || mode === (FALLOC.ZERO_RANGE | FALLOC.KEEP_SIZE)) {
          if (end > size && !keepSize) {
            if (!this.growable) throw new FuseErrno(Errno.EPERM, 'size changes need a growable export');
            await this.resize(end);
          }
          // mode 0 inside the file: the blocks are there already (QSD allows it only at/after EOF).
          if (mode !== 0 && offset < node.length()) {
            const len = Math.min(end, node.length()) - offset;
            await this.fast.changing(offset, len, () => node.writeZeroes(offset, len, { mayUnmap: false }));
          }
          return;
        }
        if (mode === (FALLOC.PUNCH_HOLE | FALLOC.KEEP_SIZE)) {
          const len = Math.min(end, size) - offset;
          if (offset < size)
            await this.fast.changing(offset, len, () => node.writeZeroes(offset, len, { mayUnmap: true }));
          return;
        }
        throw new FuseErrno(Errno.EOPNOTSUPP, `fallocate mode ${mode} is not supported`);
      },
      seek: (offset, whence) => {
        this.check();
        this.syncLength();
        return seekDataOrHole(node, offset, whence);
      },
      utimens: () => {
        throw new FuseErrno(Errno.EOPNOTSUPP, 'timestamps cannot be set');
      },
      flush: async () => {
        if (this.closed || !this.writable) return;
        this.jsStats.flushes++;
        await node.flush();
      },
      fsync: async () => {
        this.check();
        if (!this.writable) return;
        this.jsStats.flushes++;
        await node.flush();
      },
      onError: (op, err) => {
        this.jsStats.errors++;
        this.jsStats.lastError = `${op}: ${describeError(err)}`;
        // An image found corrupt is not written again, by JavaScript or by the binding (also after
        // the refusal of one range, a shared cluster: JavaScript decides every write from then on).
        if ((err as { code?: unknown } | null)?.code === 'IMAGE_CORRUPT') this.fast.allowWrites(false);
        this.onError?.(op, err);
      },
    };
  }
}

/** Waits for the kernel's INIT and reads how passthrough went on the new mount. */
async function settlePassthrough(mount: FileFsMount): Promise<PassthroughStatus> {
  if (!mount.passthrough) {
    return { active: false, why: 'kernel', reason: 'the fuse-native binding has no passthrough' };
  }
  const deadline = Date.now() + INIT_WAIT_MS;
  for (;;) {
    const info = mount.passthrough();
    if (info) return describePassthrough(info);
    if (Date.now() > deadline) {
      return { active: false, why: 'kernel', reason: 'the kernel did not send INIT in time' };
    }
    await new Promise((r) => setTimeout(r, 5));
  }
}
