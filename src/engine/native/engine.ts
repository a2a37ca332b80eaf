/**
 * The native engine: nodes of our own block layer in one graph, exports
 * served by this process through the export drivers (FUSE). Nodes open
 * read-only or read-write as the plan says; this driver decides nothing.
 */
import { closeSync, fstatSync, openSync } from 'node:fs';
import { BlockGraph } from '../../block/graph.js';
import type { PathPolicy } from '../../block/path-policy.js';
import type { BlockNode } from '../../block/types.js';
import { BlkError } from '../../errors.js';
import type { ExportStats, LiveExport } from '../../export/driver.js';
import { findExportDriver } from '../../export/drivers.js';
import type { FuseExportOptions } from '../../export/fuse/export.js';
import { fsnameFor, type MountEntry, mountOwner } from '../../export/mount-table.js';
import { ExportRegistry } from '../../export/registry.js';
import type { ExportOptions, NodeOptions } from '../../reconcile/model.js';
import { type EngineDriver, type ExportRecord, type NodeRecord, type Resolved, StepEngine } from '../core.js';
import { nativeCapabilities } from './capabilities.js';
import { resolveNode } from './resolve-node.js';

interface LiveNode extends NodeRecord {
  node: BlockNode;
  /**
   * An extra read-only fd on the image, taken before an export covers its
   * path: later file nodes of the same image open it through /proc/self/fd
   * (which reaches the file itself, not the mount over it).
   */
  pin?: number;
}

interface LiveExportRecord extends ExportRecord {
  exp: LiveExport;
}

/** The export driver's options for a manifest export (QAPI spelling → the driver's). */
function driverOptions(e: ExportOptions): FuseExportOptions {
  return {
    id: e.id,
    mountpoint: e.mountpoint,
    writable: e.writable,
    growable: e.growable,
    allowOther: e['allow-other'],
    fsname: fsnameFor('agent', process.pid),
  };
}

class NativeDriver implements EngineDriver {
  readonly name = 'native';
  readonly capabilities = nativeCapabilities;
  private readonly graph: BlockGraph;
  private readonly registry = new ExportRegistry();
  private readonly nodes = new Map<string, LiveNode>();
  private readonly live = new Map<string, LiveExportRecord>();

  constructor(policy: PathPolicy) {
    this.graph = new BlockGraph(policy);
  }

  records(): { nodes: NodeRecord[]; exports: ExportRecord[] } {
    return { nodes: [...this.nodes.values()], exports: [...this.live.values()] };
  }

  ownsMount(top: MountEntry | undefined): boolean {
    return top !== undefined && top.source === fsnameFor('agent', process.pid);
  }

  stats(id: string): ExportStats | undefined {
    return this.live.get(id)?.exp.stats;
  }

  /**
   * Opening a path one of our mounts covers would open that export, not the
   * image underneath: such a file node opens the image through the pin of a
   * node of this agent on the same path, or is refused.
   */
  private openPath(n: NodeOptions, covering: MountEntry | undefined): NodeOptions {
    if (!covering || !mountOwner(covering)) return n;
    const pinned = [...this.nodes.values()].find(
      (x) => x.options.filename === n.filename && x.pin !== undefined,
    );
    if (!pinned) {
      throw new BlkError(
        'EXPORT_EXISTS',
        `node '${n['node-name']}': '${n.filename}' is covered by a blkexport mount that is not this agent's; ` +
          'opening it would read that export, not the image',
      );
    }
    return { ...n, filename: `/proc/self/fd/${pinned.pin}` };
  }

  async addNode(n: NodeOptions, covering: MountEntry | undefined): Promise<Resolved> {
    const r = await resolveNode(this.openPath(n, covering), (name) => this.nodes.get(name)?.node);
    const node = await this.graph.openNode(r.options);
    const window = node.resolved?.();
    const resolved: Resolved = window ? { offset: window.offset, size: window.size } : {};
    if (r.driver !== undefined) resolved.driver = r.driver;
    const live: LiveNode = { options: n, node };
    if (node.role === 'protocol' && node.fileKey !== undefined) live.fileKey = node.fileKey;
    if (Object.keys(resolved).length) live.resolved = resolved;
    this.nodes.set(n['node-name'], live);
    return resolved;
  }

  async removeNode(n: NodeOptions): Promise<void> {
    const live = this.nodes.get(n['node-name']);
    if (!live) return;
    await this.graph.closeNode(n['node-name']);
    this.nodes.delete(n['node-name']);
    if (live.pin !== undefined) closeSync(live.pin);
  }

  async reopenNode(n: NodeOptions): Promise<void> {
    const live = this.nodes.get(n['node-name'])!;
    await this.graph.reopenNode(n['node-name'], { readOnly: n['read-only'] });
    live.options = n;
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

  async addExport(e: ExportOptions, createdMountpoint: boolean): Promise<void> {
    const driver = findExportDriver(e.type);
    if (!driver) throw new BlkError('NOT_SUPPORTED', `export '${e.id}': type '${e.type}' is not supported`);
    this.pinCovered(e.mountpoint);
    const exp = await this.registry.add(driver, this.nodes.get(e['node-name'])!.node, driverOptions(e));
    this.live.set(e.id, { options: e, createdMountpoint, exp });
  }

  async removeExport(e: ExportOptions): Promise<void> {
    if (!this.live.has(e.id)) return;
    try {
      await this.registry.remove(e.id);
    } finally {
      this.live.delete(e.id);
    }
  }

  async reopenExport(e: ExportOptions): Promise<void> {
    await this.registry.reopen(e.id, driverOptions(e));
    this.live.get(e.id)!.options = e;
  }

  async shutdown(): Promise<void> {
    let first: unknown;
    for (const e of [...this.live.values()]) {
      try {
        await this.removeExport(e.options);
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

/** The native engine: the shared step core over our own block layer and export drivers. */
export class NativeEngine extends StepEngine {
  constructor(policy: PathPolicy) {
    super(new NativeDriver(policy));
  }
}
