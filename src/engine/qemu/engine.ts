/**
 * The qemu engine: the same plan steps as the native engine, carried out on
 * one qemu-storage-daemon (QSD) per host over QMP. QSD outlives the agent
 * (SIGKILL the agent: exports keep serving; the next agent re-attaches).
 * Observed state is the state file of what we applied, each entry confirmed
 * by QSD's own queries (session.ts) and each export by the mount table.
 */
import { stat } from 'node:fs/promises';
import type { PathPolicy } from '../../block/path-policy.js';
import { BlkError } from '../../errors.js';
import type { MountEntry } from '../../export/mount-table.js';
import type { ExportOptions, NodeOptions } from '../../reconcile/model.js';
import { type EngineDriver, type Resolved, StepEngine } from '../core.js';
import type { NbdHostConfig } from '../native/nbd-host.js';
import { addBackingChain, namedBacking } from './backing.js';
import {
  BACKING_FORMATS,
  blockdevArgs,
  checkImageHead,
  exportArgs,
  probedQemuFormat,
  QEMU_FORMATS,
  readHead,
} from './blockdev.js';
import { qemuCapabilities } from './capabilities.js';
import { DEFAULT_QSD_DIR, type QsdPaths, qsdPaths } from './daemon.js';
import { startQsdNbdServer } from './nbd.js';
import { partitionWindow } from './partition.js';
import { QmpError } from './qmp.js';
import { deleteExport, isQsdMount, QsdSession } from './session.js';
import type { AppliedNode } from './state.js';

/** How to reach (or where to start) the host's QSD. */
export interface QemuEngineOptions {
  /** Runtime directory for the pidfile, QMP socket and state file (default /run/blkexport). */
  dir?: string;
  /** Called when the QMP connection drops without our asking (QSD died): the agent then asks for a pass. */
  onLost?: (why: string) => void;
  /**
   * Where backing files named inside images may be followed (the agent's
   * --allow-root). Without it, an image that names a backing file is refused
   * unless the manifest names the backing node.
   */
  policy?: PathPolicy;
  /** Where to say what happened outside any step (re-attach, stale clean-up). */
  log?: (msg: string, fields?: Record<string, unknown>) => void;
  /** The agent's NBD server configuration (--nbd-listen, TLS), for type: nbd exports; absent: refused. */
  nbd?: NbdHostConfig;
}

function notFound(e: unknown): boolean {
  return e instanceof QmpError && /not found|Failed to find|Cannot find/i.test(e.message);
}

class QemuDriver implements EngineDriver {
  readonly name = 'qemu';
  readonly capabilities = qemuCapabilities;

  constructor(
    readonly session: QsdSession,
    private readonly policy: PathPolicy | undefined,
    private readonly nbd: NbdHostConfig | undefined,
  ) {}

  private get state() {
    return this.session.state;
  }

  records() {
    return this.state;
  }

  refresh(): Promise<void> {
    return this.session.refresh();
  }

  async prepare(): Promise<void> {
    await this.session.attach(false);
  }

  ownsMount(top: MountEntry | undefined): boolean {
    return isQsdMount(top);
  }

  private applied(name: string): AppliedNode | undefined {
    return this.state.nodes.find((n) => n.options['node-name'] === name);
  }

  /** The format to hand QEMU for `n`, and the window of a partition node; the image is checked first. */
  private async resolve(n: NodeOptions, covering: MountEntry | undefined): Promise<Resolved> {
    const name = n['node-name'];
    if (n.driver === 'file') {
      // QSD would open whatever a FUSE mount on the path serves (maybe its own export: a deadlock).
      if (covering)
        throw new BlkError(
          'EXPORT_EXISTS',
          `node '${name}': '${n.filename}' is covered by a FUSE mount; the qemu engine opens images only while nothing is mounted over them`,
        );
      return {};
    }
    const child = n.file === undefined ? undefined : this.applied(n.file);
    if (!child) throw new BlkError('STATE', `node '${name}': file '${n.file}' is not open`);
    if (n.driver === 'partition') return this.partitionOf(n, child);
    const path = child.options.driver === 'file' ? child.options.filename : undefined;
    let driver: string = n.driver;
    const resolved: Resolved = {};
    if (path !== undefined) {
      const head = await readHead(path);
      if (driver === 'auto') driver = resolved.driver = probedQemuFormat(head, path);
      checkImageHead(driver, head, path);
    } else if (driver === 'auto' || driver === 'vmdk' || driver === 'qcow2') {
      throw new BlkError(
        'NOT_SUPPORTED',
        `node '${name}': the qemu engine checks a ${driver} image only directly over a file node`,
      );
    }
    if (!QEMU_FORMATS.includes(driver))
      throw new BlkError(
        'NOT_SUPPORTED',
        `node '${name}': driver '${driver}' is not supported by the qemu engine`,
      );
    return resolved;
  }

  /** A partition of a whole raw or qcow2 image over a file node: its window, as a raw node for QEMU. */
  private async partitionOf(n: NodeOptions, fmt: AppliedNode): Promise<Resolved> {
    const file = fmt.options.file === undefined ? undefined : this.applied(fmt.options.file);
    const format = fmt.resolved?.driver ?? fmt.options.driver;
    const path = file?.options.driver === 'file' ? file.options.filename : undefined;
    if (
      path === undefined ||
      (format !== 'raw' && format !== 'qcow2') ||
      fmt.options.offset ||
      fmt.options.size
    ) {
      throw new BlkError(
        'NOT_SUPPORTED',
        `node '${n['node-name']}': the qemu engine finds partitions only in a whole raw or qcow2 image over a file node`,
      );
    }
    const w = await partitionWindow(
      { path, format, number: n.number!, backing: fmt.options.backing },
      this.policy,
    );
    return { offset: w.offset, size: w.size };
  }

  async addNode(n: NodeOptions, covering: MountEntry | undefined): Promise<Resolved> {
    const resolved = await this.resolve(n, covering);
    // QEMU has no partition driver: it gets a raw window at the offset and size we found.
    const driver = n.driver === 'partition' ? 'raw' : (resolved.driver ?? n.driver);
    const client = await this.session.connected();
    const window = n.driver === 'partition' ? { offset: resolved.offset, size: resolved.size } : {};
    const args = blockdevArgs({ ...n, ...window }, driver);
    const st = n.driver === 'file' ? await stat(n.filename!).catch(() => undefined) : undefined;
    await client.execute('blockdev-add', args);
    // Observed options stay exactly as the step gave them; what we resolved goes in `resolved`.
    const applied: AppliedNode = { options: n, args };
    if (st) applied.fileKey = `${st.dev}:${st.ino}`;
    if (Object.keys(resolved).length) applied.resolved = resolved;
    if (BACKING_FORMATS.includes(driver) && n.backing === undefined) {
      // `backing` absent: QEMU got null. An image that names a backing file gets it as explicit
      // nodes we opened ourselves, inside the allowed roots, or is refused.
      const named = await namedBacking(client, n['node-name']);
      if (named) {
        const image = this.applied(n.file!)?.options.filename;
        await client.execute('blockdev-del', { 'node-name': n['node-name'] }).catch(() => undefined);
        const ctx = { client, owner: n['node-name'], policy: this.policy, hidden: [] as string[] };
        try {
          args.backing = await addBackingChain(ctx, image, named);
          await client.execute('blockdev-add', args);
        } catch (e) {
          for (const h of ctx.hidden)
            await client.execute('blockdev-del', { 'node-name': h }).catch(() => undefined);
          throw e;
        }
        applied.hidden = ctx.hidden;
      }
    }
    this.state.nodes.push(applied);
    await this.session.save();
    return resolved;
  }

  async removeNode(n: NodeOptions): Promise<void> {
    const name = n['node-name'];
    const client = await this.session.attach(false);
    if (client) {
      try {
        await client.execute('blockdev-del', { 'node-name': name });
      } catch (e) {
        if (!notFound(e)) throw e;
      }
      // The backing chain we opened for it, top-down.
      for (const h of this.applied(name)?.hidden ?? [])
        await client.execute('blockdev-del', { 'node-name': h }).catch(() => undefined);
    }
    this.state.nodes = this.state.nodes.filter((x) => x.options['node-name'] !== name);
    await this.session.save();
  }

  /** blockdev-reopen with the node's own arguments and the new read-only (the plan has unmounted what covers it). */
  async reopenNode(n: NodeOptions): Promise<void> {
    const live = this.applied(n['node-name'])!;
    const client = await this.session.connected();
    const args: Record<string, unknown> = { ...live.args, 'read-only': n['read-only'] };
    await client.execute('blockdev-reopen', { options: [args] });
    live.options = n;
    live.args = args;
    await this.session.save();
  }

  nbdServed(id: string): boolean {
    return this.state.exports.some((e) => e.options.id === id && e.options.type === 'nbd');
  }

  async addExport(e: ExportOptions, createdMountpoint: boolean): Promise<void> {
    const client = await this.session.connected();
    if (e.type === 'nbd') {
      if (!this.nbd)
        throw new BlkError('NOT_SUPPORTED', `export '${e.id}': this engine runs no NBD server (type: nbd)`);
      if (this.state.nbdServer === undefined) {
        this.state.nbdServer = await startQsdNbdServer(client, this.nbd, this.session.paths.dir);
        await this.session.save();
      }
    }
    await client.execute('block-export-add', exportArgs(e));
    this.state.exports.push({ options: e, createdMountpoint });
    await this.session.save();
  }

  async removeExport(e: ExportOptions): Promise<void> {
    const client = await this.session.attach(false);
    try {
      // An NBD export with clients connected is refused in QEMU's default (safe) mode: hard closes them.
      if (client) await deleteExport(client, e.id, e.type === 'nbd' ? 'hard' : undefined);
    } catch (err) {
      if (!notFound(err)) throw err;
    }
    this.state.exports = this.state.exports.filter((x) => x.options.id !== e.id);
    await this.session.save();
  }

  shutdown(): Promise<void> {
    return this.session.shutdown();
  }

  /** QSD serves on by itself: the next agent re-attaches. */
  async handover(): Promise<void> {
    this.session.detach();
  }
}

/** The qemu engine: the shared step core over one qemu-storage-daemon. */
export class QemuEngine extends StepEngine {
  readonly paths: QsdPaths;
  private readonly session: QsdSession;

  constructor(opts: QemuEngineOptions = {}) {
    const session = new QsdSession(qsdPaths(opts.dir ?? DEFAULT_QSD_DIR), {
      ...(opts.onLost ? { onLost: opts.onLost } : {}),
      ...(opts.log ? { log: opts.log } : {}),
    });
    super(new QemuDriver(session, opts.policy, opts.nbd));
    this.session = session;
    this.paths = session.paths;
  }

  /** The pid of the QSD this engine talks to, if connected. */
  get pid(): number | undefined {
    return this.session.pid;
  }

  /** Closes the QMP connection and leaves QSD serving (tests, and an agent that hands over). */
  detach(): void {
    this.session.detach();
  }
}
