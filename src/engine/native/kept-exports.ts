/**
 * The native engine's side of exports that outlive the agent process: every
 * mounted export's FUSE connection is kept in the fd holder (keeper.ts) with
 * what a successor must check; at start, what the holder kept becomes `held`
 * exports that the plan adopts or lets go. Kernels without FUSE_NOTIFY_RESEND
 * (Linux < 6.9) cannot hand a connection over safely (requests the dead
 * server had read would never be answered), so there nothing is kept and
 * exports end with the agent, as before, said once in the log.
 */

import { setTimeout as sleep } from 'node:timers/promises';
import type { FuseExport } from '../../export/fuse/export.js';
import { type FuseInit, lazyUnmount } from '../../export/fuse/file-fs.js';
import { type MountEntry, readMountTable, topMountAt } from '../../export/mount-table.js';
import type { FuseExportConfig } from '../../manifest/types.js';
import type { HeldExport } from '../core.js';
import type { ConnectionKeeper, HeldConnection, HeldMeta } from './keeper.js';

export type LogFn = (level: 'info' | 'warn', msg: string, fields?: Record<string, unknown>) => void;

/** Why connections are not kept here, or undefined when they are. */
function notKeptBecause(init: { resend?: boolean } | undefined): string | undefined {
  if (process.env.BLKEXPORT_FUSE_RESEND === 'off') return 'BLKEXPORT_FUSE_RESEND=off';
  if (!init) return 'the FUSE binding in use cannot hand a connection over (the libfuse 3 binding can)';
  if (!init.resend) return 'the kernel has no FUSE_NOTIFY_RESEND (Linux 6.9 or later has it)';
  return undefined;
}

/** How long a new mount may take to answer the kernel's INIT before it cannot be kept. */
const INIT_WAIT_MS = 5000;

/**
 * The export's connection once the kernel's INIT is answered (our worker
 * threads answer it just after mount(2) returns; until then there is nothing
 * a successor could serve). Undefined when the binding cannot hand it over.
 */
async function connectionOf(
  exp: FuseExport,
): Promise<{ fd: number; init: FuseInit; allowsOther: boolean } | undefined> {
  const deadline = Date.now() + INIT_WAIT_MS;
  for (;;) {
    try {
      return exp.connection();
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await sleep(10);
    }
  }
}

/** What the mount table says instead of the kept mount (it was unmounted by someone, maybe mounted over). */
function whyGone(table: readonly MountEntry[], h: HeldConnection): string {
  const top = topMountAt(table, h.mountpoint);
  const elsewhere = table.find((m) => m.mountId === h.meta.mountId);
  if (elsewhere) return `mount ${h.meta.mountId} is now on '${elsewhere.mountpoint}'`;
  if (!top) return `mount ${h.meta.mountId} was unmounted: nothing is mounted on the mountpoint`;
  return `mount ${h.meta.mountId} was unmounted: mount ${top.mountId} (${top.fstype}, ${top.source}) is on the mountpoint now`;
}

export class KeptExports {
  private readonly heldById = new Map<string, HeldConnection>();
  /** Set once a connection could not be kept, with why (logged once). */
  private unavailable: string | undefined;

  constructor(
    private readonly keeper: ConnectionKeeper | undefined,
    private readonly log: LogFn,
  ) {}

  /**
   * Takes what the holder kept: each entry whose mount is still there (the
   * same mount id on the same mountpoint) becomes a held export; the rest are
   * let go. Returns the held mountpoints (not stale: do not clean them).
   */
  async load(): Promise<string[]> {
    if (!this.keeper) return [];
    const { held, unreadable } = this.keeper.list();
    for (const why of unreadable) this.log('warn', 'a kept connection could not be read; let go', { why });
    const table = await readMountTable();
    for (const h of held) {
      const mount = table.find((m) => m.mountId === h.meta.mountId && m.mountpoint === h.mountpoint);
      if (!mount) {
        this.log('warn', 'a kept connection has no mount any more; let go', {
          export: h.id,
          mountpoint: h.mountpoint,
          why: whyGone(table, h),
        });
        this.closeFds(h);
        this.keeper.drop(h.id);
        continue;
      }
      this.heldById.set(h.id, h);
    }
    if (this.heldById.size)
      this.log('info', 'connections kept by the fd holder, to adopt', { exports: [...this.heldById.keys()] });
    return [...this.heldById.values()].map((h) => h.mountpoint);
  }

  /** Held exports as the engine observes them. */
  held(): HeldExport[] {
    return [...this.heldById.values()].map((h) => ({
      options: h.meta.options,
      reason: `held since ${h.meta.since}, mounted by pid ${h.meta.pid}`,
    }));
  }

  /** The held connection of export `id`, taken out of the held set (the caller adopts or releases it). */
  take(id: string): HeldConnection | undefined {
    const h = this.heldById.get(id);
    this.heldById.delete(id);
    return h;
  }

  /** The overlay files held exports use (the leftover clean-up spares them). */
  overlayFiles(): string[] {
    return [...this.heldById.values()].flatMap((h) =>
      h.meta.overlayFile === undefined ? [] : [h.meta.overlayFile],
    );
  }

  /** The overlay file of held export `id`, if it has one. */
  overlayFileOf(id: string): string | undefined {
    return this.heldById.get(id)?.meta.overlayFile;
  }

  /** A held image pin for `path` (a held mount covers its own image), handed over once. */
  takePin(path: string): number | undefined {
    for (const h of this.heldById.values()) {
      if (h.mountpoint === path && h.pinFd !== undefined) {
        const fd = h.pinFd;
        h.pinFd = undefined;
        return fd;
      }
    }
    return undefined;
  }

  /** Unmounts a held export (lazily: descriptors still open get ENOTCONN) and lets its connection go. */
  async release(id: string): Promise<void> {
    const h = this.take(id);
    if (!h) return;
    this.log('info', 'unmounting a kept export no manifest wants', { export: id, mountpoint: h.mountpoint });
    await this.releaseTaken(h);
  }

  /** release() for a connection already taken out of the held set. */
  async releaseTaken(h: HeldConnection): Promise<void> {
    await lazyUnmount(h.mountpoint).catch(() => undefined);
    this.closeFds(h);
    this.keeper?.drop(h.id);
  }

  /**
   * Keeps a just mounted or adopted export's connection in the holder; with
   * `pinFd`, the image under a mount that covers it. Where connections cannot
   * be kept, says so once and keeps nothing. Never fails the export: one that
   * could not be kept is served all the same, and ends with this process.
   */
  async keep(
    exp: FuseExport,
    options: FuseExportConfig,
    extra: {
      pinFd: number | undefined;
      imageKey: string | undefined;
      overlayFile: string | undefined;
      since: string;
      mountId: number | undefined;
      createdMountpoint: boolean;
    },
  ): Promise<void> {
    if (!this.keeper || this.unavailable !== undefined) return;
    let conn: { fd: number; init: FuseInit; allowsOther: boolean } | undefined;
    try {
      conn = await connectionOf(exp);
    } catch (e) {
      this.log('warn', 'this export will end with the agent process', {
        export: options.id,
        why: (e as Error).message,
      });
      return;
    }
    const why = notKeptBecause(conn?.init);
    if (why !== undefined || !conn || extra.mountId === undefined) {
      if (conn) this.keeper.close(conn.fd);
      this.unavailable = why ?? 'the mount was not found in the mount table';
      this.log('warn', 'native exports end with the agent process', { why: this.unavailable });
      return;
    }
    try {
      const meta: HeldMeta = {
        version: 1,
        options,
        mountId: extra.mountId,
        imageKey: extra.imageKey,
        init: conn.init,
        allowsOther: conn.allowsOther,
        since: extra.since,
        pid: process.pid,
        createdMountpoint: extra.createdMountpoint,
      };
      if (extra.overlayFile !== undefined) meta.overlayFile = extra.overlayFile;
      const fds = extra.pinFd === undefined ? [conn.fd] : [conn.fd, extra.pinFd];
      await this.keeper.putStarting(options.id, options.mountpoint, fds, meta);
    } catch (e) {
      this.log('warn', 'this export will end with the agent process', {
        export: options.id,
        why: (e as Error).message,
      });
    } finally {
      this.keeper.close(conn.fd);
    }
  }

  /** Lets the holder forget export `id` (it was unmounted). */
  forget(id: string): void {
    this.keeper?.drop(id);
  }

  /** After a clean stop: held exports nobody adopted are unmounted, and the holder goes when empty. */
  async stop(): Promise<void> {
    for (const id of [...this.heldById.keys()]) await this.release(id);
    this.keeper?.quitIfEmpty();
  }

  private closeFds(h: HeldConnection): void {
    this.keeper?.close(h.fuseFd);
    if (h.pinFd !== undefined) this.keeper?.close(h.pinFd);
  }
}
