/**
 * The ephemeral overlays of exports (`overlay: ephemeral`), independent of
 * the export type: an engine asks for the overlay node of an export, serves
 * that node instead of the export's own (FUSE and NBD exports alike),
 * and drops it when the export goes.
 *
 * Overlay files live in one directory that belongs to the process using it
 * (the agent's --overlay-dir, or a one-shot mount's), named
 * `blkexport-overlay-<export id>-<16 hex>.qcow2`: the only names the leftover
 * clean-up ever deletes, and then only when no process holds the file open
 * for writing (its QEMU-style write lock) and no kept export will reopen it.
 * A one-shot export unlinks its overlay right after opening it, so the file
 * goes with the process however it ends.
 */
import { randomBytes } from 'node:crypto';
import { closeSync, constants, openSync } from 'node:fs';
import { mkdir, readdir, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { BlockGraph } from '../block/graph.js';
import { ImageLock, lockPermsFor } from '../block/lock.js';
import { createOverlayFile, openOverlay } from '../block/overlay.js';
import type { BlockNode } from '../block/types.js';
import { BlkError } from '../errors.js';

/** The agent's overlay directory unless --overlay-dir says otherwise (QEMU's -snapshot uses /var/tmp too). */
export const DEFAULT_AGENT_OVERLAY_DIR = '/var/tmp/blkexport-overlays';

/** A one-shot mount's overlay directory unless --overlay-dir says otherwise: $TMPDIR, else /var/tmp (as QEMU's -snapshot). */
export function defaultOneShotOverlayDir(): string {
  return process.env.TMPDIR || '/var/tmp';
}

const NAME = /^blkexport-overlay-[A-Za-z0-9._-]+-[0-9a-f]{16}\.qcow2$/;

/** A file name this module makes (and the only kind it deletes). */
export function isOverlayName(name: string): boolean {
  return NAME.test(name);
}

/** One export's overlay: its node (in the engine's graph) and its file (absent once unlinked). */
export interface LiveOverlay {
  node: BlockNode;
  path: string;
  /** The file was unlinked once open (one-shot): nothing to delete later. */
  unlinked: boolean;
}

/** The node-name of export `id`'s overlay node ('#' keeps it apart from every manifest node-name). */
function overlayNodeName(id: string): string {
  return `#overlay-${id}`;
}

export class EphemeralOverlays {
  /**
   * @param dir where overlay files are made
   * @param unlinkOnceOpen delete each file as soon as it is open (one-shot: no export outlives the process)
   */
  constructor(
    readonly dir: string,
    private readonly unlinkOnceOpen = false,
  ) {}

  /** A fresh overlay for export `id` over the open node `base` of `graph`. */
  async create(graph: BlockGraph, id: string, base: BlockNode): Promise<LiveOverlay> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const path = join(this.dir, `blkexport-overlay-${id}-${randomBytes(8).toString('hex')}.qcow2`);
    try {
      await createOverlayFile(path, base);
    } catch (e) {
      throw overlayError(id, this.dir, e);
    }
    let node: BlockNode;
    try {
      node = await openOverlay(graph, overlayNodeName(id), path, base);
    } catch (e) {
      await unlink(path).catch(() => undefined);
      throw overlayError(id, this.dir, e);
    }
    if (this.unlinkOnceOpen) await unlink(path);
    return { node, path, unlinked: this.unlinkOnceOpen };
  }

  /** Reopens the overlay file an adopted export was using (its content is the export's). */
  async reopen(graph: BlockGraph, id: string, base: BlockNode, path: string): Promise<LiveOverlay> {
    if (!path.startsWith(`${this.dir}/`) || !isOverlayName(path.slice(this.dir.length + 1)))
      throw new BlkError('STATE', `export '${id}': '${path}' is not an overlay of ${this.dir}`);
    const node = await openOverlay(graph, overlayNodeName(id), path, base);
    return { node, path, unlinked: false };
  }

  /** Closes the overlay node and deletes its file: what was written through the export is gone. */
  async drop(graph: BlockGraph, o: LiveOverlay): Promise<void> {
    try {
      await graph.closeNode(o.node.nodeName);
    } finally {
      if (!o.unlinked) await this.remove(o.path);
    }
  }

  /** Deletes an overlay file this directory holds (a held export let go); a missing one is fine. */
  async remove(path: string): Promise<void> {
    await unlink(path).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'ENOENT') throw e;
    });
  }

  /**
   * Deletes what a previous process left in the directory: files named as
   * this module names them, except those in `keep` (kept exports that will
   * be adopted) and those some live process has open writable. Returns the
   * paths deleted.
   */
  async cleanLeftovers(keep: ReadonlySet<string>): Promise<string[]> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw e;
    }
    const gone: string[] = [];
    for (const name of names.filter(isOverlayName).sort()) {
      const path = join(this.dir, name);
      if (keep.has(path) || inUse(path)) continue;
      await this.remove(path);
      gone.push(path);
    }
    return gone;
  }
}

/** True when a live process holds `path` open writable (QEMU-style locks; we lock every overlay we open). */
function inUse(path: string): boolean {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  } catch {
    return true; // not ours to judge (a symlink, unreadable): leave it
  }
  try {
    ImageLock.acquire(fd, path, 'auto', lockPermsFor(false))?.release();
    return false;
  } catch (e) {
    return e instanceof BlkError && e.code === 'LOCKED';
  } finally {
    closeSync(fd);
  }
}

/** An overlay that could not be made, naming the directory (ENOSPC, EACCES, ...). */
function overlayError(id: string, dir: string, e: unknown): BlkError {
  const msg = e instanceof Error ? e.message : String(e);
  return new BlkError(
    e instanceof BlkError ? e.code : 'IO',
    `export '${id}': cannot make its overlay in ${dir}: ${msg}`,
    {},
    { cause: e },
  );
}
