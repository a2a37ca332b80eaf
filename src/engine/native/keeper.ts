/**
 * Keeps the native exports' FUSE connections outside the agent process, in
 * the fd holder (`blkexport fdstore`, native/fd_holder.c), so that they
 * outlive a restart, a crash or an upgrade of the agent: the kernel keeps a
 * connection while any descriptor of it is open, and the next agent adopts
 * what the holder kept. Each entry is an export's /dev/fuse descriptor, an
 * image pin where the mount covers its own image, and what the successor
 * must check before serving it (which mount, which image, what the kernel
 * agreed to at INIT).
 */
import { spawn } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { type NativeHelper, nativeHelper } from '../../block/lock-native.js';
import { BlkError, describeError } from '../../errors.js';
import type { FuseInit } from '../../export/fuse/file-fs.js';
import type { FuseExportConfig } from '../../manifest/types.js';

/** Where the agent's holder listens unless told otherwise (--fdstore). */
export const DEFAULT_FDSTORE_SOCKET = '/run/blkexport/fdstore.sock';

/** What a successor needs to know about a kept connection. */
export interface HeldMeta {
  version: 1;
  /** The export's options when it was mounted. */
  options: FuseExportConfig;
  /** The mount's id in /proc/self/mountinfo: the successor adopts only that very mount. */
  mountId: number;
  /** `dev:ino` of the image file behind the export's file node. */
  imageKey: string | undefined;
  /** What the kernel and the first server agreed to at FUSE_INIT. */
  init: FuseInit;
  /** The kernel granted the mount allow_other. */
  allowsOther: boolean;
  /** When the export was first mounted (ISO). */
  since: string;
  /** The agent process that mounted it. */
  pid: number;
  /** The agent created the mountpoint (and removes it with the export). */
  createdMountpoint?: boolean;
  /** overlay: ephemeral: the overlay file the export writes into (the successor reopens it). */
  overlayFile?: string;
}

/** A connection handed back by the holder: the descriptors are now this process's. */
export interface HeldConnection {
  id: string;
  mountpoint: string;
  fuseFd: number;
  /** A read-only descriptor of the image a mount covers (its mountpoint is the image). */
  pinFd: number | undefined;
  meta: HeldMeta;
}

const EMPTY = Buffer.alloc(0);

export class ConnectionKeeper {
  private native: NativeHelper | undefined;

  constructor(
    readonly socket: string,
    /**
     * How to start a holder: argv after the node binary (the blkexport entry
     * point and `fdstore`); undefined: one is started by someone else (a
     * sidecar container), wait for it.
     */
    private readonly holderArgv: string[] | undefined,
  ) {}

  private helper(): NativeHelper {
    this.native ??= nativeHelper();
    return this.native;
  }

  private call(
    op: 'PUT' | 'DROP' | 'LIST' | 'GET' | 'PING' | 'QUIT',
    name = '',
    mp = '',
    meta = EMPTY,
    fds: number[] = [],
  ) {
    const r = this.helper().holderRequest(this.socket, op, name, mp, meta, fds);
    if (!r.ok) throw new BlkError('AGENT', `fd holder on ${this.socket}: ${op} ${name}: ${r.text}`);
    return r;
  }

  /** True when a holder answers on the socket. */
  running(): boolean {
    try {
      this.call('PING');
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Starts a holder (detached, in its own session, so it outlives this
   * process) unless one answers. Exports mounted side by side share one
   * start (and the holder's lock file makes a second holder exit at once).
   */
  ensureRunning(): Promise<void> {
    if (this.running()) return Promise.resolve();
    this.starting ??= this.start().finally(() => {
      this.starting = undefined;
    });
    return this.starting;
  }

  private starting: Promise<void> | undefined;

  private async start(): Promise<void> {
    if (this.holderArgv) {
      await mkdir(dirname(this.socket), { recursive: true, mode: 0o700 });
      const child = spawn(process.execPath, this.holderArgv, { detached: true, stdio: 'ignore' });
      child.unref();
    }
    for (let i = 0; i < (this.holderArgv ? 100 : 500); i++) {
      await sleep(20);
      if (this.running()) return;
    }
    throw new BlkError('AGENT', `the fd holder did not start on ${this.socket}`);
  }

  /** Hands the holder a dup of each descriptor (the caller keeps and closes its own). */
  put(id: string, mountpoint: string, fds: number[], meta: HeldMeta): void {
    this.call('PUT', id, mountpoint, Buffer.from(JSON.stringify(meta)), fds);
  }

  /**
   * put(), starting a holder first when none answers. Each request is a
   * synchronous round trip to the holder: asking first whether it runs would
   * double the requests of every mount.
   */
  async putStarting(id: string, mountpoint: string, fds: number[], meta: HeldMeta): Promise<void> {
    try {
      this.put(id, mountpoint, fds, meta);
      return;
    } catch (e) {
      if (this.running()) throw e;
    }
    await this.ensureRunning();
    this.put(id, mountpoint, fds, meta);
  }

  /** Closes and forgets the holder's descriptors of export `id` (no-op when no holder runs). */
  drop(id: string): void {
    try {
      this.call('DROP', id);
    } catch (e) {
      if (this.running()) throw e;
    }
  }

  /**
   * Every connection the holder keeps, its descriptors now this process's
   * (the holder keeps its own until they are dropped). Entries it cannot
   * read are skipped with the reason.
   */
  list(): { held: HeldConnection[]; unreadable: string[] } {
    const out: { held: HeldConnection[]; unreadable: string[] } = { held: [], unreadable: [] };
    if (!this.running()) return out;
    const n = Number(this.call('LIST').text.split(' ')[1]);
    for (let i = 0; i < n; i++) {
      const r = this.call('GET', String(i));
      try {
        const meta = JSON.parse((r.meta ?? EMPTY).toString('utf8')) as HeldMeta;
        if (meta.version !== 1 || r.fds.length < 1) throw new BlkError('AGENT', 'unknown entry format');
        out.held.push({
          id: r.name!,
          mountpoint: r.mountpoint!,
          fuseFd: r.fds[0]!,
          pinFd: r.fds[1],
          meta,
        });
      } catch (e) {
        for (const fd of r.fds) this.helper().closeFd(fd);
        out.unreadable.push(`${r.name}: ${describeError(e)}`);
      }
    }
    return out;
  }

  /** Stops the holder when it holds nothing more (a clean stop of the agent). */
  quitIfEmpty(): void {
    if (this.running() && this.call('LIST').text === 'OK 0') this.call('QUIT');
  }

  /** Closes a descriptor the holder handed over. */
  close(fd: number): void {
    this.helper().closeFd(fd);
  }
}
