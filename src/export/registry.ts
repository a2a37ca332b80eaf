/**
 * The export core: the checks every export type shares (unique ids, one
 * export per claimed resource, a writable export needs a node that can
 * write), and the live set of exports of one process. Messages follow
 * qemu-storage-daemon's wording where it has one.
 */
import type { BlockNode } from '../block/types.js';
import { BlkError } from '../errors.js';
import type { ExportDriver, ExportDriverOptions, LiveExport } from './driver.js';

/** `node` and every node below it. */
function nodesUnder(node: BlockNode): BlockNode[] {
  return [node, ...node.children.flatMap(nodesUnder)];
}

export class ExportRegistry {
  private readonly byId = new Map<string, LiveExport>();
  /** claim key → export id, for live and starting exports. */
  private readonly claims = new Map<string, string>();
  private readonly starting = new Set<string>();
  /** What each live export was last told by setShared (told again only when it changes). */
  private readonly toldShared = new WeakMap<LiveExport, boolean>();
  /** Each live export's nodes (itself and below) and whether it was counted a writer, as of its start or last reopen. */
  private readonly nodesOf = new Map<LiveExport, { nodes: BlockNode[]; writer: boolean }>();
  /** Per node: the live exports that use it, and how many of them can write. */
  private readonly usersOf = new Map<BlockNode, { exports: Set<LiveExport>; writers: number }>();
  /** The claim key of each export that made one. */
  private readonly claimOf = new Map<string, string>();

  /** Checks, then starts an export of `node` with `driver`. */
  add<O extends ExportDriverOptions, E extends LiveExport<O>, H>(
    driver: ExportDriver<O, E, H>,
    node: BlockNode,
    opts: O,
  ): Promise<E> {
    return this.register(driver, node, opts, () => driver.start(node, opts));
  }

  /** Checks like add(), then serves the connection `held` kept for it instead of starting anew. */
  adopt<O extends ExportDriverOptions, E extends LiveExport<O>, H>(
    driver: ExportDriver<O, E, H>,
    node: BlockNode,
    opts: O,
    held: H,
  ): Promise<E> {
    const adopt = driver.adopt;
    if (!adopt) throw new BlkError('NOT_SUPPORTED', `export type '${driver.type}' cannot adopt a connection`);
    return this.register(driver, node, opts, () => adopt(node, opts, held));
  }

  /** The checks every export type shares, then `start`, then the live set. */
  private async register<O extends ExportDriverOptions, E extends LiveExport<O>, H>(
    driver: ExportDriver<O, E, H>,
    node: BlockNode,
    opts: O,
    start: () => Promise<E>,
  ): Promise<E> {
    if (this.byId.has(opts.id) || this.starting.has(opts.id)) {
      throw new BlkError('EXPORT_EXISTS', `Block export id '${opts.id}' is already in use`);
    }
    // By key and before any I/O: a FUSE mountpoint is not stat-ed while our own mount may cover it.
    const claim = driver.claim(opts);
    if (claim && this.claims.has(claim.key)) throw new BlkError('EXPORT_EXISTS', claim.taken);
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
    this.starting.add(opts.id);
    if (claim) {
      this.claims.set(claim.key, opts.id);
      this.claimOf.set(opts.id, claim.key);
    }
    try {
      const exp = await start();
      this.byId.set(opts.id, exp as unknown as LiveExport);
      this.refreshSharing(this.index(exp as unknown as LiveExport));
      return exp;
    } catch (e) {
      if (claim) {
        this.claims.delete(claim.key);
        this.claimOf.delete(opts.id);
      }
      throw e;
    } finally {
      this.starting.delete(opts.id);
    }
  }

  /** Applies mutable options of a live export in place (the driver's reopen), then re-checks sharing. */
  async reopen<O extends ExportDriverOptions>(id: string, opts: O): Promise<void> {
    const exp = this.byId.get(id) as LiveExport<O> | undefined;
    if (!exp) throw new BlkError('STATE', `no export with id '${id}'`);
    if (opts.writable && !exp.isWritable && exp.node.readOnly) {
      throw new BlkError(
        'EXPORT_INVALID',
        `export '${id}': cannot make an export of read-only node '${exp.node.nodeName}' writable`,
      );
    }
    const before = this.unindex(exp);
    try {
      await exp.reopen(opts);
    } finally {
      this.refreshSharing([...before, ...this.index(exp)]);
    }
  }

  /** Flushes and stops an export; the caller closes the nodes afterwards. */
  async remove(id: string): Promise<void> {
    const exp = this.byId.get(id);
    if (!exp) throw new BlkError('STATE', `no export with id '${id}'`);
    try {
      await exp.stop();
    } finally {
      this.byId.delete(id);
      const key = this.claimOf.get(id);
      if (key !== undefined) this.claims.delete(key);
      this.claimOf.delete(id);
      this.refreshSharing(this.unindex(exp));
    }
  }

  /** Counts a live export as a user of its nodes; returns them. */
  private index(e: LiveExport): BlockNode[] {
    const nodes = [...new Set(nodesUnder(e.node))];
    const writer = e.isWritable;
    this.nodesOf.set(e, { nodes, writer });
    for (const n of nodes) {
      const u = this.usersOf.get(n) ?? { exports: new Set<LiveExport>(), writers: 0 };
      u.exports.add(e);
      if (writer) u.writers++;
      this.usersOf.set(n, u);
    }
    return nodes;
  }

  /** Undoes index(e); returns the nodes it used. */
  private unindex(e: LiveExport): BlockNode[] {
    const { nodes, writer } = this.nodesOf.get(e) ?? { nodes: [], writer: false };
    this.nodesOf.delete(e);
    for (const n of nodes) {
      const u = this.usersOf.get(n);
      if (!u?.exports.delete(e)) continue;
      if (writer) u.writers--;
      if (u.exports.size === 0) this.usersOf.delete(n);
    }
    return nodes;
  }

  /**
   * Exports that share a node while one of them can write are told so (the
   * FUSE export then stops using the binding's read fast path: it would miss
   * the other's changes). Called after every add, reopen and remove with the
   * nodes it touched: only the exports using one of them can change, so an
   * add or remove costs its neighbours, not every export of the process.
   */
  private refreshSharing(touched: readonly BlockNode[]): void {
    const affected = new Set<LiveExport>();
    for (const n of touched) for (const e of this.usersOf.get(n)?.exports ?? []) affected.add(e);
    for (const e of affected) {
      const shared = (this.nodesOf.get(e)?.nodes ?? []).some((n) => {
        const u = this.usersOf.get(n);
        if (!u || u.exports.size < 2) return false;
        return e.isWritable || u.writers > 0;
      });
      if (this.toldShared.get(e) === shared) continue;
      this.toldShared.set(e, shared);
      e.setShared(shared);
    }
  }

  get(id: string): LiveExport | undefined {
    return this.byId.get(id);
  }

  list(): LiveExport[] {
    return [...this.byId.values()];
  }
}
