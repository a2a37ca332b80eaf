/**
 * The native engine: nodes of our own block layer in one graph, exports
 * served by this process through the export drivers (FUSE). Nodes open
 * read-only or read-write as the plan says; this driver decides nothing.
 * With a connection keeper, every mount's FUSE connection is kept outside
 * the process (kept-exports.ts), and a successor adopts it.
 */
import { closeSync, fstatSync, openSync } from 'node:fs';
import { BlockGraph } from '../../block/graph.js';
import { nativeHelper } from '../../block/lock-native.js';
import type { PathPolicy } from '../../block/path-policy.js';
import type { BlockNode } from '../../block/types.js';
import { BlkError, describeError } from '../../errors.js';
import type { ExportDriverOptions, ExportStats, LiveExport } from '../../export/driver.js';
import { findExportDriver } from '../../export/drivers.js';
import { fuseExportDriver } from '../../export/fuse/driver.js';
import type { FuseExport, FuseExportOptions } from '../../export/fuse/export.js';
import { passthroughLogLine } from '../../export/fuse/passthrough.js';
import {
  fsnameFor,
  type MountEntry,
  mountOwner,
  readMountTable,
  topMountAt,
} from '../../export/mount-table.js';
import { type NbdDriverOptions, NbdLiveExport } from '../../export/nbd/driver.js';
import { ExportRegistry } from '../../export/registry.js';
import type { FuseExportConfig } from '../../manifest/types.js';
import { inParallel } from '../../parallel.js';
import type { ExportOptions, NodeOptions } from '../../reconcile/model.js';
import {
  type EngineDriver,
  type ExportRecord,
  type HeldExport,
  type NodeRecord,
  type Resolved,
  StepEngine,
} from '../core.js';
import { DEFAULT_AGENT_OVERLAY_DIR, EphemeralOverlays, type LiveOverlay } from '../overlays.js';
import { nativeCapabilities } from './capabilities.js';
import type { ConnectionKeeper } from './keeper.js';
import { KeptExports, type LogFn } from './kept-exports.js';
import type { NbdHost } from './nbd-host.js';
import { resolveNode } from './resolve-node.js';

/** Exports flushed and unmounted at once on shutdown (each unmount is a umount(8) child process). */
const UNMOUNT_PARALLEL = 16;
/** An export answering EIO logs its first failure, then at most one line per this interval. */
const ERROR_LOG_INTERVAL_MS = 60_000;

/** Logs the failures an export answers with EIO: the first at once, then one line per interval with the count. */
function errorLogger(log: LogFn, id: string): (op: string, err: unknown) => void {
  let lastAt = Number.NEGATIVE_INFINITY;
  let quiet = 0;
  return (op, err) => {
    const now = Date.now();
    if (now - lastAt < ERROR_LOG_INTERVAL_MS) {
      quiet++;
      return;
    }
    const more = quiet > 0 ? { 'not-logged-since-last': quiet } : {};
    log('warn', 'export answered EIO', { export: id, op, error: describeError(err), ...more });
    lastAt = now;
    quiet = 0;
  };
}

/** The id of the mount on `path` by statx in the thread pool; undefined without the native helper or on failure. */
async function mountIdByStatx(path: string): Promise<number | undefined> {
  let helper: ReturnType<typeof nativeHelper>;
  try {
    helper = nativeHelper();
  } catch {
    return undefined;
  }
  const id = await helper.mountIdAsync(path);
  return id >= 0 ? id : undefined;
}

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
  /** The mount's id in the mount table (how an adopted mount, made by another pid, is recognized). */
  mountId: number | undefined;
  /** overlay: ephemeral: the overlay node the export serves, and its file. */
  overlay?: LiveOverlay;
}

/** What the native engine is built with. */
export interface NativeEngineOptions {
  policy: PathPolicy;
  /** Keeps FUSE connections outside the process (the agent's fd holder); absent: exports end with the process. */
  keeper?: ConnectionKeeper;
  log?: LogFn;
  /** Where `overlay: ephemeral` exports keep their overlay files (default DEFAULT_AGENT_OVERLAY_DIR). */
  overlayDir?: string;
  /** The host-level NBD server `type: nbd` exports are added to; absent: such exports are refused. */
  nbd?: NbdHost;
}

/** The FUSE export driver's options for a manifest export (QAPI spelling → the driver's). */
function driverOptions(e: FuseExportConfig): FuseExportOptions {
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
  readonly kept: KeptExports;
  readonly overlays: EphemeralOverlays;
  private readonly log: LogFn;
  readonly nbd: NbdHost | undefined;
  /** Passthrough outcomes already logged (one line each, naming the first export). */
  private readonly passthroughSaid = new Set<string>();

  constructor(opts: NativeEngineOptions) {
    this.graph = new BlockGraph(opts.policy);
    this.log = opts.log ?? (() => undefined);
    this.kept = new KeptExports(opts.keeper, this.log);
    this.overlays = new EphemeralOverlays(opts.overlayDir ?? DEFAULT_AGENT_OVERLAY_DIR);
    this.nbd = opts.nbd;
  }

  nbdServed(id: string): boolean {
    const exp = this.live.get(id)?.exp;
    return exp instanceof NbdLiveExport && exp.served;
  }

  connections(id: string): number | undefined {
    const exp = this.live.get(id)?.exp;
    return exp instanceof NbdLiveExport ? exp.connections : undefined;
  }

  /** The export driver's options for `e`: FUSE mount options, or the NBD name and the host's server. */
  private async startOptions(e: ExportOptions): Promise<ExportDriverOptions> {
    if (e.type === 'fuse') return driverOptions(e);
    if (!this.nbd)
      throw new BlkError('NOT_SUPPORTED', `export '${e.id}': this engine runs no NBD server (type: nbd)`);
    const opts: NbdDriverOptions = {
      id: e.id,
      writable: e.writable,
      name: e.name,
      description: e.description,
      server: await this.nbd.server(),
    };
    return opts;
  }

  records(): { nodes: NodeRecord[]; exports: ExportRecord[] } {
    return { nodes: [...this.nodes.values()], exports: [...this.live.values()] };
  }

  /** Ours: mounted by this process, or adopted (the mount still names the pid that made it). */
  ownsMount(top: MountEntry | undefined): boolean {
    if (top === undefined) return false;
    if (top.source === fsnameFor('agent', process.pid)) return true;
    return [...this.live.values()].some((e) => e.adopted && e.mountId === top.mountId);
  }

  held(): HeldExport[] {
    return this.kept.held();
  }

  stats(id: string): ExportStats | undefined {
    return this.live.get(id)?.exp.stats;
  }

  /**
   * Opening a path one of our mounts covers would open that export, not the
   * image underneath: such a file node opens the image through the pin of a
   * node of this agent on the same path, or is refused.
   */
  private openPath(n: NodeOptions, covering: MountEntry | undefined): { options: NodeOptions; pin?: number } {
    if (!covering || !mountOwner(covering)) return { options: n };
    // A held mount over its own image: the holder kept a pin of the image under it.
    const heldPin = this.kept.takePin(n.filename!);
    if (heldPin !== undefined)
      return { options: { ...n, filename: `/proc/self/fd/${heldPin}` }, pin: heldPin };
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
    return { options: { ...n, filename: `/proc/self/fd/${pinned.pin}` } };
  }

  async addNode(n: NodeOptions, covering: MountEntry | undefined): Promise<Resolved> {
    const path = this.openPath(n, covering);
    const r = await resolveNode(path.options, (name) => this.nodes.get(name)?.node);
    const node = await this.graph.openNode(r.options).catch((e) => {
      if (path.pin !== undefined) closeSync(path.pin);
      throw e;
    });
    const window = node.resolved?.();
    const resolved: Resolved = window ? { offset: window.offset, size: window.size } : {};
    if (r.driver !== undefined) resolved.driver = r.driver;
    const live: LiveNode = { options: n, node };
    if (path.pin !== undefined) live.pin = path.pin;
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
    const opts = await this.startOptions(e);
    if (e.type === 'fuse') this.pinCovered(e.mountpoint);
    const base = this.nodes.get(e['node-name'])!.node;
    const overlay =
      e.overlay === 'ephemeral' ? await this.overlays.create(this.graph, e.id, base) : undefined;
    let exp: LiveExport;
    try {
      exp = await this.registry.add(driver, overlay?.node ?? base, opts);
    } catch (err) {
      if (overlay) await this.overlays.drop(this.graph, overlay).catch(() => undefined);
      throw err;
    }
    exp.onError = errorLogger(this.log, e.id);
    this.notePassthrough(e.id, exp);
    const since = new Date().toISOString();
    const mountId = e.type === 'fuse' ? await this.mountIdOf(e.mountpoint) : undefined;
    const record: LiveExportRecord = {
      options: e,
      createdMountpoint,
      exp,
      mountId,
      servedSince: since,
      adopted: false,
    };
    if (overlay) record.overlay = overlay;
    this.live.set(e.id, record);
    await this.keep(e, exp, since, mountId, createdMountpoint);
  }

  /**
   * Logs whether FUSE passthrough serves a raw export, once per outcome (the
   * first export it applies to is named; status shows every export's).
   * Nodes that never qualify (qcow2, windows) say nothing.
   */
  private notePassthrough(id: string, exp: LiveExport): void {
    const pt = (exp as Partial<FuseExport>).passthrough;
    if (!pt || (!pt.active && pt.why === 'node')) return;
    const key = pt.active ? 'active' : pt.reason;
    if (this.passthroughSaid.has(key)) return;
    this.passthroughSaid.add(key);
    this.log(pt.active || pt.why === 'options' ? 'info' : 'warn', passthroughLogLine(pt), { export: id });
  }

  /**
   * The id of our mount on `mountpoint`, just made: asked of the kernel for
   * that one path (statx, native helper), else looked up in the mount table.
   * The table costs about 20 us per mount on the host for each export
   * mounted: a first pass of thousands of exports grew quadratic on it.
   */
  private async mountIdOf(mountpoint: string): Promise<number | undefined> {
    const id = await mountIdByStatx(mountpoint);
    if (id !== undefined) return id;
    const top = topMountAt(await readMountTable(), mountpoint);
    return top && this.ownsMount(top) ? top.mountId : undefined;
  }

  /** Keeps the export's connection (and the pin of an image it covers) in the fd holder. */
  private async keep(
    e: ExportOptions,
    exp: LiveExport,
    since: string,
    mountId: number | undefined,
    createdMountpoint: boolean,
  ): Promise<void> {
    if (e.type !== 'fuse') return; // an NBD connection is a socket of this process: nothing to keep
    const pin = [...this.nodes.values()].find(
      (n) => n.options.filename === e.mountpoint && n.pin !== undefined,
    );
    await this.kept.keep(exp as FuseExport, e, {
      pinFd: pin?.pin,
      // The image's file, not the overlay's (an overlay export serves its overlay node).
      imageKey: this.nodes.get(e['node-name'])?.node.fileKey ?? exp.node.fileKey,
      overlayFile: this.live.get(e.id)?.overlay?.path,
      since,
      mountId,
      createdMountpoint,
    });
  }

  /**
   * Serves a held export: its image must still be the one the mount was made
   * of (`dev:ino`), else the held mount is let go and the export mounted anew,
   * so nobody reads another file through the old mount.
   */
  async adoptExport(e: ExportOptions): Promise<void> {
    const h = this.kept.take(e.id);
    if (!h) throw new BlkError('STATE', `export '${e.id}' is not held`);
    const node = this.nodes.get(e['node-name'])!.node;
    const createdMountpoint = h.meta.createdMountpoint ?? false;
    const anew = async (why: string) => {
      this.log('warn', `${why}; unmounting it and mounting anew`, { export: e.id });
      await this.kept.releaseTaken(h);
      if (h.meta.overlayFile !== undefined) await this.overlays.remove(h.meta.overlayFile);
      await this.addExport(e, createdMountpoint);
    };
    if (h.meta.imageKey !== node.fileKey) return anew('the image under a kept mount was replaced');
    // An overlay export keeps what was written: its overlay file is reopened, never made anew.
    let overlay: LiveOverlay | undefined;
    if (h.meta.options.overlay !== undefined) {
      if (h.meta.overlayFile === undefined) return anew('a kept overlay export names no overlay file');
      try {
        overlay = await this.overlays.reopen(this.graph, e.id, node, h.meta.overlayFile);
      } catch (err) {
        return anew(`its overlay could not be reopened (${(err as Error).message})`);
      }
    }
    const held = { fd: h.fuseFd, init: h.meta.init, allowsOther: h.meta.allowsOther, resend: true };
    let exp: LiveExport;
    try {
      exp = await this.registry.adopt(
        fuseExportDriver,
        overlay?.node ?? node,
        driverOptions(h.meta.options),
        held,
      );
    } catch (err) {
      if (overlay) await this.graph.closeNode(overlay.node.nodeName).catch(() => undefined);
      throw err;
    }
    exp.onError = errorLogger(this.log, e.id);
    this.notePassthrough(e.id, exp);
    if (h.pinFd !== undefined) closeSync(h.pinFd);
    const since = new Date().toISOString();
    const record: LiveExportRecord = {
      options: h.meta.options,
      exp,
      mountId: h.meta.mountId,
      servedSince: since,
      adopted: true,
      createdMountpoint,
    };
    if (overlay) record.overlay = overlay;
    this.live.set(e.id, record);
    // Options that changed while nobody served it are applied now, like a reopen.
    await this.reopenExport(e);
    await this.keep(e, exp, h.meta.since, h.meta.mountId, createdMountpoint);
  }

  async releaseHeld(id: string): Promise<void> {
    const overlay = this.kept.overlayFileOf(id);
    await this.kept.release(id);
    if (overlay !== undefined) await this.overlays.remove(overlay);
  }

  async removeExport(e: ExportOptions): Promise<void> {
    const live = this.live.get(e.id);
    if (!live) return;
    try {
      await this.registry.remove(e.id);
      // What was written through the export goes with it (a failed unmount leaves it to the next start).
      if (live.overlay) await this.overlays.drop(this.graph, live.overlay);
    } finally {
      this.live.delete(e.id);
      this.kept.forget(e.id);
    }
  }

  async reopenExport(e: ExportOptions): Promise<void> {
    if (e.type !== 'fuse')
      throw new BlkError('INTERNAL', `export '${e.id}': ${e.type} exports change nothing in place`);
    await this.registry.reopen(e.id, driverOptions(e));
    this.live.get(e.id)!.options = e;
  }

  async shutdown(): Promise<void> {
    let first: unknown;
    // Exports are independent of each other: flush and unmount up to UNMOUNT_PARALLEL at once
    // (one after another, a thousand took 29 s, too close to systemd's stop timeout).
    await inParallel([...this.live.values()], UNMOUNT_PARALLEL, async (e) => {
      try {
        await this.removeExport(e.options);
      } catch (err) {
        first ??= err;
      }
    });
    await this.graph.close().catch((err) => {
      first ??= err;
    });
    for (const n of this.nodes.values()) if (n.pin !== undefined) closeSync(n.pin);
    this.nodes.clear();
    const heldOverlays = this.kept.overlayFiles();
    await this.kept.stop().catch((err) => {
      first ??= err;
    });
    // Held exports nobody adopted were unmounted just now: their overlays go with them.
    for (const f of heldOverlays)
      await this.overlays.remove(f).catch((err) => {
        first ??= err;
      });
    await this.nbd?.close().catch((err) => {
      first ??= err;
    });
    if (first !== undefined) throw first;
  }

  /**
   * Hands the exports over instead of stopping: every node flushed to stable
   * storage, nothing unmounted. The process then exits; the connections stay
   * in the fd holder, and the next agent adopts them.
   */
  async handover(): Promise<void> {
    for (const n of this.graph.nodes()) if (!n.readOnly) await n.flush();
  }
}

/** The native engine: the shared step core over our own block layer and export drivers. */
export class NativeEngine extends StepEngine {
  private readonly native: NativeDriver;

  constructor(opts: NativeEngineOptions) {
    const driver = new NativeDriver(opts);
    super(driver);
    this.native = driver;
  }

  /** Takes the connections the fd holder kept (before stale mounts are cleaned): their mountpoints. */
  loadHeld(): Promise<string[]> {
    return this.native.kept.load();
  }

  /**
   * Deletes the overlay files a previous agent left (after loadHeld): every
   * file of ours in the overlay directory but those held exports will reopen
   * and those a live process has open. Returns the paths deleted.
   */
  cleanOverlayLeftovers(): Promise<string[]> {
    return this.native.overlays.cleanLeftovers(new Set(this.native.kept.overlayFiles()));
  }

  /** The overlay directory. */
  get overlayDir(): string {
    return this.native.overlays.dir;
  }
}
