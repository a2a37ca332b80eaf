/**
 * The native engine: nodes of our own block layer in one graph, FUSE exports
 * served by this process. Nodes open read-only and are reopened read-write
 * only while a writable export needs them, so a read-only export never holds
 * an image writable.
 */
import { closeSync, fstatSync, openSync } from 'node:fs';
import { stat, unlink, writeFile } from 'node:fs/promises';
import { BlockGraph } from '../../block/graph.js';
import type { PathPolicy } from '../../block/path-policy.js';
import type { BlockNode } from '../../block/types.js';
import { BlkError } from '../../errors.js';
import type { FuseExport } from '../../export/fuse/export.js';
import { fsnameFor, mountOwner, readMountTable, topMountAt } from '../../export/mount-table.js';
import { ExportRegistry } from '../../export/registry.js';
import type { ExportOptions, NodeOptions, Observed, Step } from '../../reconcile/model.js';
import type { Engine, EngineExport } from '../engine.js';
import { type ResolvedNode, resolveNode } from './resolve-node.js';

interface LiveNode {
  options: NodeOptions;
  resolved: ResolvedNode['resolved'];
  node: BlockNode;
  /** dev:ino of the host file when opened (a file node): a different inode later is drift. */
  fileKey: string | undefined;
  /**
   * An extra read-only fd on the image, taken before an export covers its
   * path: later file nodes of the same image open it through /proc/self/fd
   * (which reaches the file itself, not the mount over it).
   */
  pin?: number;
}

interface LiveExport {
  options: ExportOptions;
  exp: FuseExport;
  createdMountpoint: boolean;
}

/** Node-names from `node` down through its children (file first, then backing). */
function chainOf(node: BlockNode): string[] {
  const out = [node.nodeName];
  for (const c of node.children) out.push(...chainOf(c));
  return out;
}

export class NativeEngine implements Engine {
  readonly name = 'native';
  private readonly graph: BlockGraph;
  private readonly registry = new ExportRegistry();
  private readonly nodes = new Map<string, LiveNode>();
  private readonly live = new Map<string, LiveExport>();

  constructor(policy: PathPolicy) {
    this.graph = new BlockGraph(policy);
  }

  async observe(): Promise<Observed> {
    const table = await readMountTable();
    const fsname = fsnameFor('agent', process.pid);
    const observed: Observed = { nodes: [], exports: [] };
    for (const n of this.nodes.values()) {
      const o: Observed['nodes'][number] = { options: n.options };
      if (Object.keys(n.resolved).length) o.resolved = n.resolved;
      observed.nodes.push(o);
    }
    for (const e of this.live.values()) {
      const top = topMountAt(table, e.options.mountpoint);
      if (top && top.source === fsname) observed.exports.push({ options: e.options, state: 'mounted' });
      else
        observed.exports.push({ options: e.options, state: 'unmounted', reason: 'not in the mount table' });
    }
    return observed;
  }

  /**
   * File nodes whose path now names a different file (replaced image) or none.
   * Paths covered by our own mounts are skipped: stat would ask this very
   * process (never do that), and a mountpoint cannot be renamed over anyway.
   */
  async driftedNodes(): Promise<{ nodeName: string; reason: string }[]> {
    const table = await readMountTable();
    const files = [...this.nodes.values()].filter((n) => {
      const path = n.options.filename;
      if (n.options.driver !== 'file' || !path || !n.fileKey) return false;
      const top = topMountAt(table, path);
      return !(top && mountOwner(top));
    });
    // One stat per distinct path, all at once (many nodes may name one image).
    const paths = [...new Set(files.map((n) => n.options.filename!))];
    const keys = new Map(
      await Promise.all(
        paths.map(async (p) => {
          try {
            const st = await stat(p);
            return [p, `${st.dev}:${st.ino}`] as const;
          } catch {
            return [p, undefined] as const;
          }
        }),
      ),
    );
    const out: { nodeName: string; reason: string }[] = [];
    for (const n of files) {
      const key = keys.get(n.options.filename!);
      if (key === undefined) out.push({ nodeName: n.options['node-name'], reason: 'image file missing' });
      else if (key !== n.fileKey)
        out.push({ nodeName: n.options['node-name'], reason: 'image file replaced' });
    }
    return out;
  }

  exports(): EngineExport[] {
    return [...this.live.values()].map((e) => ({
      id: e.options.id,
      mountpoint: e.options.mountpoint,
      nodeChain: chainOf(e.exp.node),
      stats: e.exp.stats,
    }));
  }

  async apply(step: Step): Promise<void> {
    switch (step.action) {
      case 'add-node':
        return this.addNode(step.node);
      case 'remove-node':
        return this.removeNode(step.node['node-name']);
      case 'reopen-node':
        return this.reopenNode(step.node);
      case 'add-export':
        return this.addExport(step.export);
      case 'remove-export':
        return this.removeExport(step.export.id);
      case 'reopen-export':
        return this.reopenExport(step.export);
      case 'repair-export':
        await this.removeExport(step.export.id).catch(() => undefined);
        return this.addExport(step.export);
    }
  }

  private async addNode(options: NodeOptions): Promise<void> {
    const name = options['node-name'];
    if (this.nodes.has(name)) throw new BlkError('IMAGE_INVALID', `node '${name}' is already open`);
    let openAs = options;
    if (options.driver === 'file' && options.filename) {
      // Opening a path a blkexport mount covers would open that export, not the image underneath.
      const top = topMountAt(await readMountTable(), options.filename);
      if (top && mountOwner(top)) {
        const pinned = [...this.nodes.values()].find(
          (n) => n.options.filename === options.filename && n.pin !== undefined,
        );
        if (!pinned) {
          throw new BlkError(
            'EXPORT_EXISTS',
            `node '${name}': '${options.filename}' is covered by a blkexport mount that is not this agent's; ` +
              'opening it would read that export, not the image',
          );
        }
        openAs = { ...options, filename: `/proc/self/fd/${pinned.pin}` };
      }
    }
    const r = await resolveNode(openAs, (n) => this.nodes.get(n)?.node);
    const node = await this.graph.openNode(r.options);
    this.nodes.set(name, {
      options,
      resolved: r.resolved,
      node,
      fileKey: node.role === 'protocol' ? node.fileKey : undefined,
    });
  }

  private async removeNode(name: string): Promise<void> {
    const live = this.nodes.get(name);
    if (!live) return;
    await this.graph.closeNode(name);
    this.nodes.delete(name);
    if (live.pin !== undefined) closeSync(live.pin);
  }

  /** Pins the images an export on `mountpoint` is about to cover (see LiveNode.pin). */
  private pinCovered(mountpoint: string): void {
    for (const n of this.nodes.values()) {
      if (n.options.driver !== 'file' || n.options.filename !== mountpoint || n.pin !== undefined) continue;
      const fd = openSync(mountpoint, 'r');
      const st = fstatSync(fd);
      if (`${st.dev}:${st.ino}` === n.fileKey) n.pin = fd;
      else closeSync(fd); // replaced meanwhile: the drift check will replace the node
    }
  }

  private async reopenNode(options: NodeOptions): Promise<void> {
    const live = this.nodes.get(options['node-name']);
    if (!live) throw new BlkError('IMAGE_INVALID', `node '${options['node-name']}' is not open`);
    // read-only: true forces read-only now; false only allows a writable export to upgrade it.
    if (options['read-only'] && !live.node.readOnly) {
      if (this.writableUsers(live.node).length) {
        throw new BlkError('EXPORT_INVALID', `node '${options['node-name']}' is used by a writable export`);
      }
      await live.node.reopen({ readOnly: true });
    }
    live.options = options;
  }

  /** Writable exports whose node chain includes `node`. */
  private writableUsers(node: BlockNode): LiveExport[] {
    return [...this.live.values()].filter(
      (e) => e.exp.isWritable && chainOf(e.exp.node).includes(node.nodeName),
    );
  }

  /** Every node-name in the chain must allow writing (no `read-only: true`, no auto-probed raw). */
  private async makeWritable(exportId: string, node: BlockNode): Promise<void> {
    for (const name of chainOf(node)) {
      const live = this.nodes.get(name);
      if (live?.options['read-only']) {
        throw new BlkError('EXPORT_INVALID', `export '${exportId}': node '${name}' is read-only`);
      }
      if (live?.options.driver === 'auto' && live.resolved.driver === 'raw') {
        throw new BlkError(
          'EXPORT_INVALID',
          `export '${exportId}': node '${name}' was only probed as raw; give format: raw to write to it`,
        );
      }
    }
    if (node.readOnly) await node.reopen({ readOnly: false });
  }

  /** Reopens the chain read-only when no writable export needs it any more. */
  private async relaxWritable(node: BlockNode): Promise<void> {
    if (!node.readOnly && this.writableUsers(node).length === 0) await node.reopen({ readOnly: true });
  }

  private async addExport(options: ExportOptions): Promise<void> {
    const live = this.nodes.get(options['node-name']);
    if (!live)
      throw new BlkError(
        'EXPORT_INVALID',
        `export '${options.id}': node '${options['node-name']}' is not open`,
      );
    let created = false;
    if (options['create-mountpoint']) {
      try {
        await writeFile(options.mountpoint, '', { flag: 'wx', mode: 0o600 });
        created = true;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
    }
    try {
      if (options.writable) await this.makeWritable(options.id, live.node);
      this.pinCovered(options.mountpoint);
      const exp = await this.registry.addFuse(live.node, {
        id: options.id,
        mountpoint: options.mountpoint,
        writable: options.writable,
        growable: options.growable,
        allowOther: options['allow-other'],
        fsname: fsnameFor('agent', process.pid),
      });
      this.live.set(options.id, { options, exp, createdMountpoint: created });
    } catch (e) {
      if (created) await unlink(options.mountpoint).catch(() => undefined);
      await this.relaxWritable(live.node).catch(() => undefined);
      throw e;
    }
  }

  private async removeExport(id: string): Promise<void> {
    const e = this.live.get(id);
    if (!e) return;
    try {
      await this.registry.remove(id);
    } finally {
      this.live.delete(id);
      if (e.createdMountpoint) await unlink(e.options.mountpoint).catch(() => undefined);
    }
    await this.relaxWritable(e.exp.node);
  }

  private async reopenExport(options: ExportOptions): Promise<void> {
    const e = this.live.get(options.id);
    if (!e) throw new BlkError('EXPORT_INVALID', `export '${options.id}' is not live`);
    if (options.writable && !e.exp.isWritable) await this.makeWritable(options.id, e.exp.node);
    await e.exp.setWritable(options.writable);
    e.exp.setGrowable(options.growable);
    e.exp.setAllowOther(options['allow-other']);
    e.options = options;
    this.registry.refreshSharing();
    if (!options.writable) await this.relaxWritable(e.exp.node);
  }

  async shutdown(): Promise<void> {
    let first: unknown;
    for (const id of [...this.live.keys()]) {
      try {
        await this.removeExport(id);
      } catch (err) {
        first ??= err;
      }
    }
    await this.graph.close().catch((err) => {
      first ??= err;
    });
    for (const n of this.nodes.values()) if (n.pin !== undefined) closeSync(n.pin);
    this.nodes.clear();
    if (first !== undefined) throw first;
  }
}
