/**
 * The step core both engines share, like QEMU's block layer core around its
 * drivers: step dispatch (one step at a time), mountpoint creation and
 * clean-up, mount-table observation, and the rules every engine keeps (a
 * writable export writes through writable nodes only; a format that was
 * only probed as raw is never written). A driver (native, qemu) fills in the
 * engine-specific half of each step and decides nothing the plan decides.
 */
import { stat, unlink } from 'node:fs/promises';
import { BlkError } from '../errors.js';
import type { ExportStats } from '../export/driver.js';
import { createMountpoint } from '../export/fuse/driver.js';
import { lazyUnmount } from '../export/fuse/file-fs.js';
import {
  fuseMountOn,
  type MountEntry,
  mountTableChanging,
  readMountTable,
  recentMountTable,
  topMountAt,
} from '../export/mount-table.js';
import { NodeGraph } from '../manifest/graph.js';
import { mountpointOf } from '../manifest/types.js';
import type {
  EngineCapabilities,
  EngineName,
  ExportOptions,
  NodeOptions,
  Observed,
  ObservedExport,
  ObservedNode,
  Scope,
  Step,
} from '../reconcile/model.js';
import type { Engine, EngineExport } from './engine.js';
import { probedRawError } from './rules.js';

/** What an engine worked out when it applied a node (a probed driver, a partition's window). */
export type Resolved = NonNullable<ObservedNode['resolved']>;

/** A node as a driver keeps it: the options of its add/reopen step, and what was resolved. */
export interface NodeRecord {
  options: NodeOptions;
  resolved?: Resolved;
  /** A file node's `dev:ino` when it was opened: the path naming another file later is drift. */
  fileKey?: string;
}

/** An export as a driver keeps it. */
export interface ExportRecord {
  options: ExportOptions;
  /** The core created the mountpoint file (create-mountpoint): it goes with the export. */
  createdMountpoint: boolean;
  /** Served by this process since (ISO); the mount itself may be older when it was adopted. */
  servedSince?: string;
  /** This process adopted the export from a previous one (its connection was kept). */
  adopted?: boolean;
}

/** A mount a previous process left, its connection kept for this engine, that nobody serves yet. */
export interface HeldExport {
  options: ExportOptions;
  /** "held since T, mounted by pid N". */
  reason: string;
}

/** Steps that open, close or reopen nodes only: no mount changes. */
const NODE_STEPS: ReadonlySet<Step['action']> = new Set(['add-node', 'remove-node', 'reopen-node']);

/** The engine-specific half of each step, as a struct of callbacks. */
export interface EngineDriver {
  readonly name: EngineName;
  readonly capabilities: EngineCapabilities;
  /** What plan steps created, as kept now (synchronous: for rules and status). */
  records(): { nodes: readonly NodeRecord[]; exports: readonly ExportRecord[] };
  /** Brings records() up to date with the engine's reality (the qemu engine asks QSD); before observe. */
  refresh?(): Promise<void>;
  /** Gets ready for a step (the qemu engine loads its state and re-attaches). */
  prepare?(): Promise<void>;
  /** True when `top`, the topmost mount on an export's mountpoint, is this engine's. */
  ownsMount(top: MountEntry | undefined): boolean;

  /** Opens a node (children are open); `covering` is the FUSE mount on a file node's path, if any. */
  addNode(n: NodeOptions, covering: MountEntry | undefined): Promise<Resolved>;
  removeNode(n: NodeOptions): Promise<void>;
  /** Applies the node's mutable options (its `read-only`) in place. */
  reopenNode(n: NodeOptions): Promise<void>;
  addExport(e: ExportOptions, createdMountpoint: boolean): Promise<void>;
  removeExport(e: ExportOptions): Promise<void>;
  /** Absent when the engine changes no export option in place (its capabilities say so). */
  reopenExport?(e: ExportOptions): Promise<void>;
  /** Mounts kept for this engine that no process serves (observed as `held`). */
  held?(): HeldExport[];
  /** Serves the held export `e.id` with the options `e` (its nodes are open). */
  adoptExport?(e: ExportOptions): Promise<void>;
  /** Unmounts a held export nobody wants and lets its connection go. */
  releaseHeld?(id: string): Promise<void>;
  stats?(id: string): ExportStats | undefined;
  /** NBD exports: whether the export is in the NBD server now (the observe half of exports without a mountpoint). */
  nbdServed?(id: string): boolean;
  /** NBD exports: the clients connected to it now. */
  connections?(id: string): number | undefined;
  /** Removes every export and closes every node. */
  shutdown(): Promise<void>;
  /** Flushes and leaves every export serving for the next agent (absent: nothing to do). */
  handover?(): Promise<void>;
}

/**
 * File nodes whose path now names a different file (the image was replaced)
 * or none. A path under a FUSE mount is not looked at: stat would reach the
 * mount's server (maybe this very process: never do that), not the image.
 */
async function fileDrift(
  nodes: readonly NodeRecord[],
  table: readonly MountEntry[],
): Promise<Map<string, string>> {
  const files = nodes.filter((n) => {
    const path = n.options.filename;
    return n.options.driver === 'file' && path && n.fileKey && !fuseMountOn(table, path);
  });
  // One stat per distinct path, all at once (many nodes may name one image).
  const paths = [...new Set(files.map((n) => n.options.filename!))];
  const keys = new Map(
    await Promise.all(
      paths.map(async (p) => {
        const st = await stat(p).catch(() => undefined);
        return [p, st && `${st.dev}:${st.ino}`] as const;
      }),
    ),
  );
  const out = new Map<string, string>();
  for (const n of files) {
    const key = keys.get(n.options.filename!);
    if (key === undefined) out.set(n.options['node-name'], 'image file missing');
    else if (key !== n.fileKey) out.set(n.options['node-name'], 'image file replaced');
  }
  return out;
}

/** The refusal of writing through node `node` (of export `exportId`) whose format was only probed as raw. */
function probedRaw(node: string, exportId?: string): BlkError {
  const of = exportId === undefined ? '' : ` (export '${exportId}')`;
  return probedRawError(`node '${node}'${of}`, 'format: raw');
}

/** An Engine: the shared step core over one driver. */
export class StepEngine implements Engine {
  readonly name: EngineName;
  readonly capabilities: EngineCapabilities;
  /** observe/apply/shutdown run one at a time (GET /observed may come during a pass). */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(readonly driver: EngineDriver) {
    this.name = driver.name;
    this.capabilities = driver.capabilities;
  }

  /** Runs `fn` after every operation queued before it. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  observe(scope?: Scope): Promise<Observed> {
    return this.serial(async () => {
      await this.driver.refresh?.();
      const records = this.driver.records();
      const nodes = scope
        ? records.nodes.filter((n) => scope.nodes.has(n.options['node-name']))
        : records.nodes;
      const exports = scope
        ? records.exports.filter((e) => scope.exports.has(e.options.id))
        : records.exports;
      const held = (this.driver.held?.() ?? []).filter((h) => !scope || scope.exports.has(h.options.id));
      // Nothing of this engine to look at (an incremental pass about another engine's exports, or
      // about exports not made yet): no mount table to read, a thousand lines with as many exports.
      if (nodes.length === 0 && exports.length === 0 && held.length === 0) return { nodes: [], exports: [] };
      const table = await recentMountTable();
      const drift = await fileDrift(nodes, table);
      const observed: Observed = { nodes: [], exports: [] };
      for (const n of nodes) {
        const o: ObservedNode = { options: n.options };
        if (n.resolved && Object.keys(n.resolved).length) o.resolved = n.resolved;
        const why = drift.get(n.options['node-name']);
        if (why !== undefined) o.drift = why;
        observed.nodes.push(o);
      }
      for (const e of exports) observed.exports.push(this.observeExport(e.options, table));
      for (const h of held) observed.exports.push({ options: h.options, state: 'held', reason: h.reason });
      return observed;
    });
  }

  /**
   * One export's state: a FUSE export by the mount table, an NBD export by
   * the NBD server's table of exports (`mounted` then means served).
   */
  private observeExport(e: ExportOptions, table: readonly MountEntry[]): ObservedExport {
    if (e.type === 'nbd')
      return this.driver.nbdServed?.(e.id)
        ? { options: e, state: 'mounted' }
        : { options: e, state: 'unmounted', reason: 'not in the NBD server' };
    if (this.driver.ownsMount(topMountAt(table, e.mountpoint))) return { options: e, state: 'mounted' };
    return { options: e, state: 'unmounted', reason: 'not in the mount table' };
  }

  exportIds(): string[] {
    return this.driver.records().exports.map((e) => e.options.id);
  }

  exports(): EngineExport[] {
    const { nodes, exports } = this.driver.records();
    const graph = new NodeGraph(nodes.map((n) => n.options));
    return exports.map((e) => ({
      id: e.options.id,
      type: e.options.type,
      ...(e.options.type === 'fuse'
        ? { mountpoint: e.options.mountpoint }
        : { nbdName: e.options.name, connections: this.driver.connections?.(e.options.id) ?? 0 }),
      nodeChain: graph.below(e.options['node-name']),
      stats: this.driver.stats?.(e.options.id),
      ...(e.servedSince !== undefined ? { servedSince: e.servedSince } : {}),
      adopted: e.adopted ?? false,
    }));
  }

  apply(step: Step): Promise<void> {
    return this.serial(async () => {
      // Export steps mount, unmount or remount (here or in qemu-storage-daemon): the mount table changes,
      // before and after the step (a table read while QSD was still mounting must not serve afterwards).
      const mounts = !NODE_STEPS.has(step.action);
      if (mounts) mountTableChanging();
      try {
        await this.applyStep(step);
      } finally {
        if (mounts) mountTableChanging();
      }
    });
  }

  private async applyStep(step: Step): Promise<void> {
    await this.driver.prepare?.();
    switch (step.action) {
      case 'add-node':
        return this.addNode(step.node);
      case 'remove-node':
        return this.driver.removeNode(step.node);
      case 'reopen-node':
        return this.reopenNode(step.node);
      case 'add-export':
        return this.addExport(step.export);
      case 'remove-export':
        return this.removeExport(step.export);
      case 'reopen-export':
        return this.reopenExport(step.export);
      case 'repair-export':
        return this.repairExport(step.export);
      case 'adopt-export':
        return this.adoptExport(step.export);
    }
  }

  handover(): Promise<void> {
    return this.serial(async () => {
      await this.driver.handover?.();
    });
  }

  /** The driver removes everything; mountpoints the core created go too. */
  shutdown(): Promise<void> {
    return this.serial(async () => {
      const created = this.driver
        .records()
        .exports.filter((e) => e.createdMountpoint)
        .map((e) => mountpointOf(e.options))
        .filter((mp) => mp !== undefined);
      await this.driver.shutdown();
      await Promise.all(created.map((mp) => unlink(mp).catch(() => undefined)));
    });
  }

  private node(name: string): NodeRecord | undefined {
    return this.driver.records().nodes.find((n) => n.options['node-name'] === name);
  }

  private exportRecord(id: string): ExportRecord | undefined {
    return this.driver.records().exports.find((e) => e.options.id === id);
  }

  private async addNode(n: NodeOptions): Promise<void> {
    const name = n['node-name'];
    if (this.node(name)) throw new BlkError('STATE', `node '${name}' is already open`);
    const covering =
      n.driver === 'file' && n.filename !== undefined
        ? fuseMountOn(await recentMountTable(), n.filename)
        : undefined;
    const resolved = await this.driver.addNode(n, covering);
    if (n.driver === 'auto' && !n['read-only'] && resolved.driver === 'raw') {
      await this.driver.removeNode(n).catch(() => undefined);
      throw probedRaw(name);
    }
  }

  private async reopenNode(n: NodeOptions): Promise<void> {
    const name = n['node-name'];
    const live = this.node(name);
    if (!live) throw new BlkError('STATE', `node '${name}' is not open`);
    if (!n['read-only'] && n.driver === 'auto' && live.resolved?.driver === 'raw') throw probedRaw(name);
    if (n['read-only']) {
      const writer = this.writersThrough(name)[0];
      if (writer !== undefined)
        throw new BlkError('STATE', `node '${name}' is used by writable export '${writer}'`);
    }
    await this.driver.reopenNode(n);
  }

  /** Writable live exports that write through node `name`. */
  private writersThrough(name: string): string[] {
    const { nodes, exports } = this.driver.records();
    const graph = new NodeGraph(nodes.map((x) => x.options));
    return exports
      .filter(
        (e) =>
          e.options.writable &&
          e.options.overlay === undefined &&
          graph.fileChain(e.options['node-name']).includes(name),
      )
      .map((e) => e.options.id);
  }

  /** A writable export writes through writable nodes only, none of them a format only probed as raw. */
  private checkWritable(e: ExportOptions): void {
    if (e.overlay !== undefined) return; // it writes into its overlay; the nodes stay read-only
    const nodes = this.driver.records().nodes;
    const graph = new NodeGraph(nodes.map((n) => n.options));
    for (const name of graph.fileChain(e['node-name'])) {
      const n = this.node(name);
      if (!n) continue;
      if (n.options['read-only'])
        throw new BlkError('EXPORT_INVALID', `export '${e.id}': node '${name}' is read-only`);
      if (n.options.driver === 'auto' && n.resolved?.driver === 'raw') throw probedRaw(name, e.id);
    }
  }

  private async addExport(e: ExportOptions): Promise<void> {
    if (!this.node(e['node-name']))
      throw new BlkError('STATE', `export '${e.id}': node '${e['node-name']}' is not open`);
    if (this.exportRecord(e.id))
      throw new BlkError('EXPORT_EXISTS', `Block export id '${e.id}' is already in use`);
    if (e.writable) this.checkWritable(e);
    const mountpoint = mountpointOf(e);
    const created =
      e.type === 'fuse' && e['create-mountpoint'] ? await createMountpoint(e.mountpoint) : false;
    try {
      await this.driver.addExport(e, created);
    } catch (err) {
      if (created && mountpoint !== undefined) await unlink(mountpoint).catch(() => undefined);
      throw err;
    }
  }

  private async removeExport(e: ExportOptions): Promise<void> {
    const live = this.exportRecord(e.id);
    if (!live) {
      if (this.driver.held?.().some((h) => h.options.id === e.id)) await this.driver.releaseHeld?.(e.id);
      return;
    }
    await this.driver.removeExport(live.options);
    const mountpoint = mountpointOf(live.options);
    if (live.createdMountpoint && mountpoint !== undefined) await unlink(mountpoint).catch(() => undefined);
  }

  private async reopenExport(e: ExportOptions): Promise<void> {
    const live = this.exportRecord(e.id);
    if (!live) throw new BlkError('STATE', `export '${e.id}' is not live`);
    if (!this.driver.reopenExport)
      throw new BlkError(
        'INTERNAL',
        `the ${this.name} engine changes no export in place (the plan asked it to)`,
      );
    if (e.writable) this.checkWritable(e);
    await this.driver.reopenExport(e);
  }

  /** Serves a held export: the checks of a new export, then the driver adopts its connection. */
  private async adoptExport(e: ExportOptions): Promise<void> {
    if (!this.node(e['node-name']))
      throw new BlkError('STATE', `export '${e.id}': node '${e['node-name']}' is not open`);
    if (!this.driver.adoptExport) throw new BlkError('INTERNAL', `the ${this.name} engine adopts no export`);
    if (e.writable) this.checkWritable(e);
    await this.driver.adoptExport(e);
  }

  /** Removes what is left of the export, clears a stale mount of ours on its mountpoint, mounts again. */
  private async repairExport(e: ExportOptions): Promise<void> {
    await this.removeExport(e).catch(() => undefined);
    if (e.type === 'fuse' && this.driver.ownsMount(topMountAt(await readMountTable(), e.mountpoint)))
      await lazyUnmount(e.mountpoint).catch(() => undefined);
    await this.addExport(e);
  }
}
