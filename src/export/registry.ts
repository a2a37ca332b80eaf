/**
 * The export core: the checks every export type shares (unique ids, one
 * export per mountpoint, a writable export needs a writable node, the
 * mountpoint exists and is a regular file), and the live set of exports.
 * Messages follow qemu-storage-daemon's wording where it has one.
 */
import { stat } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import type { BlockNode } from '../block/types.js';
import { BlkError } from '../errors.js';
import { FuseExport, type FuseExportOptions } from './fuse/export.js';

/** `node` and every node below it. */
function nodesUnder(node: BlockNode): BlockNode[] {
  return [node, ...node.children.flatMap(nodesUnder)];
}

/** Checks that `mountpoint` is an absolute path to an existing regular file (QSD's messages). */
export async function checkMountpoint(mountpoint: string): Promise<void> {
  if (!isAbsolute(mountpoint)) {
    throw new BlkError('EXPORT_INVALID', `mountpoint '${mountpoint}' must be an absolute path`);
  }
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(mountpoint);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'No such file or directory' : (e as Error).message;
    throw new BlkError('EXPORT_INVALID', `Failed to stat '${mountpoint}': ${why}`);
  }
  if (!st.isFile()) throw new BlkError('EXPORT_INVALID', `'${mountpoint}' is not a regular file`);
}

export class ExportRegistry {
  private readonly byId = new Map<string, FuseExport>();
  private readonly byMountpoint = new Map<string, FuseExport>();
  private readonly pending = new Set<string>();

  /** Creates and mounts a FUSE export of `node`. */
  async addFuse(node: BlockNode, opts: FuseExportOptions): Promise<FuseExport> {
    if (this.byId.has(opts.id) || this.pending.has(`id:${opts.id}`)) {
      throw new BlkError('EXPORT_EXISTS', `Block export id '${opts.id}' is already in use`);
    }
    // By string and before any stat: stat-ing our own mount from here could deadlock.
    if (this.byMountpoint.has(opts.mountpoint) || this.pending.has(`mp:${opts.mountpoint}`)) {
      throw new BlkError('EXPORT_EXISTS', `There already is a FUSE export on '${opts.mountpoint}'`);
    }
    if (opts.writable && node.readOnly) {
      throw new BlkError(
        'EXPORT_INVALID',
        `export '${opts.id}': cannot export read-only node '${node.nodeName}' as writable`,
      );
    }
    if (opts.writable && !node.capabilities().write) {
      throw new BlkError(
        'NOT_SUPPORTED',
        `export '${opts.id}': node '${node.nodeName}' (${node.driver}) cannot be written by this version`,
      );
    }
    this.pending.add(`id:${opts.id}`);
    this.pending.add(`mp:${opts.mountpoint}`);
    try {
      await checkMountpoint(opts.mountpoint);
      const exp = await FuseExport.start(node, opts).catch((e: Error) => {
        throw new BlkError('MOUNT_FAILED', e.message, {}, { cause: e });
      });
      this.byId.set(opts.id, exp);
      this.byMountpoint.set(opts.mountpoint, exp);
      this.refreshSharing();
      return exp;
    } finally {
      this.pending.delete(`id:${opts.id}`);
      this.pending.delete(`mp:${opts.mountpoint}`);
    }
  }

  /** Flushes and unmounts an export; the caller closes the nodes afterwards. */
  async remove(id: string): Promise<void> {
    const exp = this.byId.get(id);
    if (!exp) throw new BlkError('EXPORT_INVALID', `no export with id '${id}'`);
    try {
      await exp.stop();
    } finally {
      this.byId.delete(id);
      this.byMountpoint.delete(exp.mountpoint);
      this.refreshSharing();
    }
  }

  /**
   * Exports that share a node while one of them can write do not use the
   * binding's read fast path (each would miss the other's invalidations).
   * Call after adding, removing or reopening an export.
   */
  refreshSharing(): void {
    const all = this.list().map((e) => ({ e, nodes: new Set(nodesUnder(e.node)) }));
    for (const a of all) {
      const shared = all.some(
        (b) => b !== a && (a.e.isWritable || b.e.isWritable) && [...a.nodes].some((n) => b.nodes.has(n)),
      );
      a.e.setFastPath(!shared);
    }
  }

  get(id: string): FuseExport | undefined {
    return this.byId.get(id);
  }

  list(): FuseExport[] {
    return [...this.byId.values()];
  }
}
