/**
 * The qemu engine: the same plan steps as the native engine, applied to one
 * qemu-storage-daemon (QSD) per host over QMP. QSD is started on the first
 * step that needs it and outlives the agent (SIGKILL the agent: exports keep
 * serving; the next agent re-attaches). Observed state is the state file of
 * what we applied, each entry confirmed by QSD's query-named-block-nodes /
 * query-block-exports and each export by the kernel's mount table. When QSD
 * dies, its stale mounts are cleaned and the next pass applies everything again.
 */
import { createHash } from 'node:crypto';
import { unlink, writeFile } from 'node:fs/promises';
import { openImage } from '../../block/open-image.js';
import { findPartition } from '../../block/partition.js';
import { type PathPolicy, resolveImplicitFile } from '../../block/path-policy.js';
import { BlkError } from '../../errors.js';
import { lazyUnmount } from '../../export/fuse/file-fs.js';
import { type MountEntry, readMountTable, topMountAt } from '../../export/mount-table.js';
import type { ExportOptions, NodeOptions, Observed, Step } from '../../reconcile/model.js';
import type { Engine, EngineExport } from '../engine.js';
import {
  BACKING_FORMATS,
  blockdevArgs,
  checkImageHead,
  exportArgs,
  probedQemuFormat,
  QEMU_FORMATS,
  readHead,
} from './blockdev.js';
import { DEFAULT_QSD_DIR, type QsdPaths, qsdPaths, runningQsd, startQsd, waitExit } from './daemon.js';
import { QmpClient, QmpError } from './qmp.js';
import {
  type AppliedExport,
  type AppliedNode,
  emptyState,
  loadState,
  type QemuState,
  saveState,
} from './state.js';

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
}

interface QsdNodeInfo {
  'node-name': string;
  drv: string;
  ro: boolean;
  /** The backing file the image names (even when we passed backing: null), and its recorded format. */
  image?: { 'backing-filename'?: string; 'backing-filename-format'?: string };
}

interface QsdExportInfo {
  id: string;
  'node-name': string;
  type: string;
  'shutting-down': boolean;
}

/** A FUSE mount QSD made: fstype `fuse`, source `/dev/fuse`. */
function isQsdMount(e: MountEntry | undefined): boolean {
  return e !== undefined && e.fstype === 'fuse' && e.source === '/dev/fuse';
}

/** Longest backing chain followed from an image's own header. */
const MAX_BACKING_DEPTH = 16;

function notFound(e: unknown): boolean {
  return e instanceof QmpError && /not found|Failed to find|Cannot find/i.test(e.message);
}

export class QemuEngine implements Engine {
  readonly name = 'qemu';
  readonly paths: QsdPaths;
  private client: QmpClient | undefined;
  private state: QemuState = emptyState();
  private loaded = false;
  private stopping = false;
  /** observe/apply/shutdown run one at a time (GET /observed may come during a pass). */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: QemuEngineOptions = {}) {
    this.paths = qsdPaths(opts.dir ?? DEFAULT_QSD_DIR);
  }

  /** The pid of the QSD this engine talks to, if connected. */
  get pid(): number | undefined {
    return this.client?.isOpen ? this.state.pid : undefined;
  }

  /** Runs `fn` after every operation queued before it. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.queue.then(fn, fn);
    this.queue = run.catch(() => undefined);
    return run;
  }

  private log(msg: string, fields?: Record<string, unknown>): void {
    this.opts.log?.(msg, fields);
  }

  private save(): Promise<void> {
    return saveState(this.paths.state, this.state);
  }

  /**
   * The QMP connection: re-attaches to the running QSD, or (with `start`)
   * starts one. A daemon that died leaves stale mounts: they are cleaned
   * and the state emptied first, so the plan adds everything again.
   */
  private async attach(start: boolean): Promise<QmpClient | undefined> {
    if (this.client?.isOpen) return this.client;
    if (this.stopping) throw new BlkError('AGENT', 'the qemu engine is shutting down');
    if (!this.loaded) {
      this.state = await loadState(this.paths.state);
      this.loaded = true;
    }
    let pid = await runningQsd(this.paths);
    if (pid === undefined) {
      if (this.state.nodes.length || this.state.exports.length) await this.cleanAfterDeath();
      if (!start) return undefined;
      pid = await startQsd(this.paths);
      this.log('qemu-storage-daemon started', { pid, qmp: this.paths.qmp });
      this.state = emptyState(pid);
      await this.save();
    }
    const client = await QmpClient.connect(this.paths.qmp);
    client.on('close', () => {
      if (this.client !== client) return;
      this.client = undefined;
      if (!this.stopping) this.opts.onLost?.('the QMP connection to qemu-storage-daemon closed');
    });
    this.client = client;
    if (this.state.pid !== pid) {
      // The state describes another daemon: nothing in this one is known to be ours as the manifests say.
      this.state = emptyState(pid);
      await this.save();
    } else if (this.state.nodes.length || this.state.exports.length) {
      this.log('re-attached to qemu-storage-daemon', {
        pid,
        nodes: this.state.nodes.length,
        exports: this.state.exports.length,
      });
    }
    await this.removeOrphans(client);
    return client;
  }

  /** Removes exports and nodes QSD has that the state does not know (a step whose record was lost). */
  private async removeOrphans(client: QmpClient): Promise<void> {
    const known = new Set(this.state.exports.map((e) => e.options.id));
    for (const e of await client.execute<QsdExportInfo[]>('query-block-exports')) {
      if (known.has(e.id)) continue;
      this.log('removing an export qemu-storage-daemon has but the state does not', { export: e.id });
      await this.deleteExport(client, e.id).catch(() => undefined);
    }
    const knownNodes = new Set(
      this.state.nodes.flatMap((n) => [n.options['node-name'], ...(n.hidden ?? [])]),
    );
    // Parents before children: repeat while something could be deleted.
    for (let progress = true; progress; ) {
      progress = false;
      const nodes = await client.execute<QsdNodeInfo[]>('query-named-block-nodes', { flat: true });
      for (const n of nodes) {
        if (knownNodes.has(n['node-name']) || n['node-name'].startsWith('#')) continue;
        try {
          await client.execute('blockdev-del', { 'node-name': n['node-name'] });
          this.log('removed a node qemu-storage-daemon had but the state did not', { node: n['node-name'] });
          progress = true;
        } catch {
          // still in use by another orphan: next round
        }
      }
    }
  }

  /** QSD died: lazily unmount its stale mounts, remove mountpoints we created, forget what was applied. */
  private async cleanAfterDeath(): Promise<void> {
    const table = await readMountTable();
    for (const e of this.state.exports) {
      const mp = e.options.mountpoint;
      if (isQsdMount(topMountAt(table, mp))) {
        await lazyUnmount(mp).catch((err) =>
          this.log('cannot unmount a stale mount', { mountpoint: mp, error: String(err) }),
        );
        this.log('cleaned a stale mount of a dead qemu-storage-daemon', {
          mountpoint: mp,
          pid: this.state.pid,
        });
      }
      if (e.createdMountpoint) await unlink(mp).catch(() => undefined);
    }
    this.state = emptyState();
    await this.save();
  }

  observe(): Promise<Observed> {
    return this.serial(() => this.observeNow());
  }

  private async observeNow(): Promise<Observed> {
    const client = await this.attach(false);
    if (!client) return { nodes: [], exports: [] };
    const qnodes = new Map(
      (await client.execute<QsdNodeInfo[]>('query-named-block-nodes', { flat: true })).map((n) => [
        n['node-name'],
        n,
      ]),
    );
    const qexports = new Map(
      (await client.execute<QsdExportInfo[]>('query-block-exports')).map((e) => [e.id, e]),
    );
    // Entries QSD no longer has are forgotten: the plan adds them again.
    const nodes = this.state.nodes.filter((n) => qnodes.has(n.options['node-name']));
    const exports = this.state.exports.filter((e) => qexports.has(e.options.id));
    if (nodes.length !== this.state.nodes.length || exports.length !== this.state.exports.length) {
      this.state.nodes = nodes;
      this.state.exports = exports;
      await this.save();
    }
    const table = await readMountTable();
    const observed: Observed = { nodes: [], exports: [] };
    for (const n of nodes) {
      const o: Observed['nodes'][number] = { options: n.options };
      if (n.resolved && Object.keys(n.resolved).length) o.resolved = n.resolved;
      observed.nodes.push(o);
    }
    for (const e of exports) {
      if (isQsdMount(topMountAt(table, e.options.mountpoint)))
        observed.exports.push({ options: e.options, state: 'mounted' });
      else
        observed.exports.push({ options: e.options, state: 'unmounted', reason: 'not in the mount table' });
    }
    return observed;
  }

  exports(): EngineExport[] {
    const byName = new Map(this.state.nodes.map((n) => [n.options['node-name'], n.options]));
    const chain = (name: string): string[] => {
      const out: string[] = [];
      const visit = (x: string) => {
        if (out.includes(x)) return;
        out.push(x);
        const n = byName.get(x);
        if (n?.file) visit(n.file);
        if (typeof n?.backing === 'string') visit(n.backing);
      };
      visit(name);
      return out;
    };
    return this.state.exports.map((e) => ({
      id: e.options.id,
      mountpoint: e.options.mountpoint,
      nodeChain: chain(e.options['node-name']),
      stats: undefined,
    }));
  }

  apply(step: Step): Promise<void> {
    return this.serial(() => this.applyNow(step));
  }

  private async applyNow(step: Step): Promise<void> {
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
        // QEMU 7.2 cannot change a FUSE export in place: remove it and add it again (a remount).
        await this.removeExport(step.export.id);
        return this.addExport(step.export);
      case 'repair-export': {
        await this.removeExport(step.export.id).catch(() => undefined);
        const top = topMountAt(await readMountTable(), step.export.mountpoint);
        if (isQsdMount(top)) await lazyUnmount(step.export.mountpoint).catch(() => undefined);
        return this.addExport(step.export);
      }
    }
  }

  private applied(name: string): AppliedNode | undefined {
    return this.state.nodes.find((n) => n.options['node-name'] === name);
  }

  private async addNode(given: NodeOptions): Promise<void> {
    // Observed options stay exactly as the step gave them; what we resolve goes in `resolved`.
    const asGiven = given;
    let n = given;
    const name = n['node-name'];
    if (this.applied(name)) throw new BlkError('IMAGE_INVALID', `node '${name}' is already open`);
    let driver: string = n.driver;
    const resolved: AppliedNode['resolved'] = {};
    if (n.partition !== undefined) {
      const p = await this.findPartitionOf(n);
      resolved.offset = p.offset;
      resolved.size = p.size;
      n = { ...n, offset: p.offset, size: p.size };
    }
    if (n.driver === 'file') {
      // QSD would open whatever a FUSE mount on the path serves (maybe its own export: a deadlock).
      const top = topMountAt(await readMountTable(), n.filename!);
      if (top?.fstype.startsWith('fuse')) {
        throw new BlkError(
          'EXPORT_EXISTS',
          `node '${name}': '${n.filename}' is covered by a FUSE mount; the qemu engine opens images only while nothing is mounted over them`,
        );
      }
    } else {
      const child = n.file === undefined ? undefined : this.applied(n.file);
      if (!child) throw new BlkError('IMAGE_INVALID', `node '${name}': file '${n.file}' is not open`);
      const path = child.options.driver === 'file' ? child.options.filename : undefined;
      if (path !== undefined) {
        const head = await readHead(path);
        if (driver === 'auto') {
          driver = probedQemuFormat(head, path);
          resolved.driver = driver;
        }
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
    }
    const client = (await this.attach(true))!;
    const args = blockdevArgs(n, driver);
    await client.execute('blockdev-add', args);
    const applied: AppliedNode = { options: asGiven, args };
    if (Object.keys(resolved).length) applied.resolved = resolved;
    if (BACKING_FORMATS.includes(driver) && n.backing === undefined) {
      // `backing` absent: QEMU got null. An image that names a backing file gets it as explicit
      // nodes we opened ourselves, inside the allowed roots, or is refused.
      const image = this.applied(n.file!)?.options.filename;
      const named = await this.namedBacking(client, name);
      if (named) {
        await client.execute('blockdev-del', { 'node-name': name }).catch(() => undefined);
        const hidden: string[] = [];
        try {
          const top = await this.addBackingChain(client, name, image, named, 1, hidden);
          args.backing = top;
          await client.execute('blockdev-add', args);
        } catch (e) {
          for (const h of hidden)
            await client.execute('blockdev-del', { 'node-name': h }).catch(() => undefined);
          throw e;
        }
        applied.hidden = hidden;
      }
    }
    this.state.nodes.push(applied);
    await this.save();
  }

  /**
   * `partition:` over a raw or qcow2 node: the partition table is read by our
   * own block layer (read-only, from the image file), and QEMU gets a raw
   * window with the offset and size found.
   */
  private async findPartitionOf(n: NodeOptions): Promise<{ offset: number; size: number }> {
    const name = n['node-name'];
    const fmt = n.file === undefined ? undefined : this.applied(n.file);
    const file = fmt?.options.file === undefined ? undefined : this.applied(fmt.options.file);
    const driver = fmt?.resolved?.driver ?? fmt?.options.driver;
    const path = file?.options.driver === 'file' ? file.options.filename : undefined;
    if (
      !fmt ||
      path === undefined ||
      (driver !== 'raw' && driver !== 'qcow2') ||
      fmt.options.offset ||
      fmt.options.size
    ) {
      throw new BlkError(
        'NOT_SUPPORTED',
        `node '${name}': the qemu engine finds partitions only in a whole raw or qcow2 image over a file node`,
      );
    }
    if (topMountAt(await readMountTable(), path)?.fstype.startsWith('fuse'))
      throw new BlkError('EXPORT_EXISTS', `node '${name}': '${path}' is covered by a FUSE mount`);
    const roots = this.opts.policy?.allowedRoots;
    const img = await openImage({
      filename: path,
      format: driver,
      readOnly: true,
      backing: fmt.options.backing === null ? 'none' : 'follow',
      ...(roots !== undefined && roots !== 'any' ? { allowedRoots: [...roots] } : {}),
    });
    try {
      const read = async (off: number, len: number) => {
        const buf = Buffer.alloc(len);
        await img.node.read(off, buf);
        return buf;
      };
      return await findPartition(read, img.node.length(), n.partition!, path);
    } finally {
      await img.close();
    }
  }

  /** The backing file a node's image names (QSD's image info), with its recorded format. */
  private async namedBacking(
    client: QmpClient,
    nodeName: string,
  ): Promise<{ name: string; format: string | undefined } | undefined> {
    const info = (await client.execute<QsdNodeInfo[]>('query-named-block-nodes', { flat: true })).find(
      (x) => x['node-name'] === nodeName,
    );
    const name = info?.image?.['backing-filename'];
    return name ? { name, format: info?.image?.['backing-filename-format'] } : undefined;
  }

  /**
   * Adds the backing chain an image names, bottom-up, as nodes of our own
   * naming (recorded in `hidden`, top-down), each file resolved with the path
   * policy and each format taken from the image, never probed. Returns the
   * node-name of the chain's top.
   */
  private async addBackingChain(
    client: QmpClient,
    owner: string,
    image: string | undefined,
    named: { name: string; format: string | undefined },
    depth: number,
    hidden: string[],
  ): Promise<string> {
    const refuse = (why: string) =>
      new BlkError(
        'BACKING_POLICY',
        `node '${owner}': backing file '${named.name}' ${why}; name the backing node in the manifest (backing: NODE) or set backing: null`,
        image === undefined ? {} : { file: image, field: 'backing_file' },
      );
    if (!this.opts.policy || image === undefined) throw refuse('is not followed by the qemu engine here');
    if (depth > MAX_BACKING_DEPTH)
      throw new BlkError('BACKING_CHAIN', `node '${owner}': backing chain longer than ${MAX_BACKING_DEPTH}`);
    if (!named.format || !QEMU_FORMATS.includes(named.format))
      throw refuse(
        `has no usable recorded format (${named.format ?? 'none'}); backing files are never probed`,
      );
    const path = await resolveImplicitFile(
      this.opts.policy,
      image,
      named.name,
      'backing file',
      'backing_file',
    );
    const top = topMountAt(await readMountTable(), path);
    if (top?.fstype.startsWith('fuse')) throw refuse(`(${path}) is covered by a FUSE mount`);
    const tag = `bk${createHash('sha1').update(owner).digest('hex').slice(0, 8)}d${depth}`;
    const fileName = `${tag}f`;
    await client.execute('blockdev-add', {
      driver: 'file',
      'node-name': fileName,
      filename: path,
      'read-only': true,
    });
    hidden.push(fileName);
    checkImageHead(named.format, await readHead(path), path);
    const args: Record<string, unknown> = {
      driver: named.format,
      'node-name': tag,
      file: fileName,
      'read-only': true,
    };
    if (BACKING_FORMATS.includes(named.format)) args.backing = null;
    await client.execute('blockdev-add', args);
    hidden.unshift(tag);
    const deeper = BACKING_FORMATS.includes(named.format) ? await this.namedBacking(client, tag) : undefined;
    if (deeper) {
      await client.execute('blockdev-del', { 'node-name': tag });
      hidden.shift();
      args.backing = await this.addBackingChain(client, owner, path, deeper, depth + 1, hidden);
      await client.execute('blockdev-add', args);
      hidden.unshift(tag);
    }
    return tag;
  }

  private async removeNode(name: string): Promise<void> {
    const client = await this.attach(false);
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
    this.state.nodes = this.state.nodes.filter((n) => n.options['node-name'] !== name);
    await this.save();
  }

  /**
   * blockdev-reopen with the node's own arguments and the new read-only. QEMU
   * reopens a file node by its name; when an export of ours is mounted over
   * that name, QSD would open its own mount (a deadlock), so those exports
   * are removed first and added again after the reopen.
   */
  private async reopenNode(n: NodeOptions): Promise<void> {
    const live = this.applied(n['node-name']);
    if (!live) throw new BlkError('IMAGE_INVALID', `node '${n['node-name']}' is not open`);
    const client = (await this.attach(true))!;
    const covering =
      live.options.driver === 'file' && isQsdMount(topMountAt(await readMountTable(), live.options.filename!))
        ? this.state.exports.filter((e) => e.options.mountpoint === live.options.filename)
        : [];
    for (const e of covering) await this.removeExport(e.options.id);
    const args: Record<string, unknown> = { ...live.args, 'read-only': n['read-only'] };
    try {
      await client.execute('blockdev-reopen', { options: [args] });
      live.options = n;
      live.args = args;
      await this.save();
    } finally {
      for (const e of covering) await this.addExport(e.options);
    }
  }

  /** A writable export needs every node under it writable, and no format only probed as raw. */
  private checkWritable(e: ExportOptions): void {
    const seen = new Set<string>();
    for (let name: string | undefined = e['node-name']; name !== undefined && !seen.has(name); ) {
      seen.add(name);
      const n = this.applied(name);
      if (!n) break;
      if (n.options['read-only'])
        throw new BlkError('EXPORT_INVALID', `export '${e.id}': node '${name}' is read-only`);
      if (n.options.driver === 'auto' && n.resolved?.driver === 'raw') {
        throw new BlkError(
          'EXPORT_INVALID',
          `export '${e.id}': node '${name}' was only probed as raw; give format: raw to write to it`,
        );
      }
      name = n.options.file;
    }
  }

  private async addExport(e: ExportOptions): Promise<void> {
    if (!this.applied(e['node-name']))
      throw new BlkError('EXPORT_INVALID', `export '${e.id}': node '${e['node-name']}' is not open`);
    if (e.writable) this.checkWritable(e);
    const client = (await this.attach(true))!;
    let created = false;
    if (e['create-mountpoint']) {
      try {
        await writeFile(e.mountpoint, '', { flag: 'wx', mode: 0o600 });
        created = true;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
    }
    try {
      await client.execute('block-export-add', exportArgs(e));
    } catch (err) {
      if (created) await unlink(e.mountpoint).catch(() => undefined);
      throw err;
    }
    const applied: AppliedExport = { options: e, createdMountpoint: created };
    this.state.exports.push(applied);
    await this.save();
  }

  /** block-export-del, then wait for BLOCK_EXPORT_DELETED (the unmount is done by then). */
  private async deleteExport(client: QmpClient, id: string): Promise<void> {
    await client.executeAndWait('block-export-del', { id }, 'BLOCK_EXPORT_DELETED', (d) => d.id === id);
  }

  private async removeExport(id: string): Promise<void> {
    const e = this.state.exports.find((x) => x.options.id === id);
    const client = await this.attach(false);
    if (client) {
      try {
        await this.deleteExport(client, id);
      } catch (err) {
        if (!notFound(err)) throw err;
      }
    }
    this.state.exports = this.state.exports.filter((x) => x.options.id !== id);
    await this.save();
    if (e?.createdMountpoint) await unlink(e.options.mountpoint).catch(() => undefined);
  }

  /** Quits QSD (it unmounts every export and closes every node), then forgets the state. */
  shutdown(): Promise<void> {
    this.stopping = true;
    return this.serial(() => this.shutdownNow());
  }

  private async shutdownNow(): Promise<void> {
    if (!this.loaded) {
      this.state = await loadState(this.paths.state);
      this.loaded = true;
    }
    const pid = await runningQsd(this.paths);
    if (pid !== undefined) {
      const client = this.client?.isOpen
        ? this.client
        : await QmpClient.connect(this.paths.qmp).catch(() => undefined);
      this.client = undefined;
      if (client) {
        await client.execute('quit').catch(() => undefined);
        client.close();
      } else process.kill(pid, 'SIGTERM');
      await waitExit(pid);
    }
    if (pid === undefined || (await runningQsd(this.paths)) === undefined) {
      for (const e of this.state.exports) {
        if (e.createdMountpoint) await unlink(e.options.mountpoint).catch(() => undefined);
      }
      this.state = emptyState();
      await unlink(this.paths.state).catch(() => undefined);
    }
  }

  /** Closes the QMP connection and leaves QSD serving (tests, and an agent that hands over). */
  detach(): void {
    this.stopping = true;
    const c = this.client;
    this.client = undefined;
    c?.close();
  }
}
