/**
 * The qemu engine's hold on the host's qemu-storage-daemon (QSD): the QMP
 * connection, and the state file of what we applied to that daemon. QSD is
 * started on the first step that needs it and outlives the agent; a new agent
 * re-attaches. When QSD died, its stale mounts are cleaned and the state
 * emptied, so the next plan adds everything again.
 */
import { unlink } from 'node:fs/promises';
import { BlkError } from '../../errors.js';
import { lazyUnmount } from '../../export/fuse/file-fs.js';
import { type MountEntry, readMountTable, topMountAt } from '../../export/mount-table.js';
import { type QsdPaths, runningQsd, startQsd, waitExit } from './daemon.js';
import { QmpClient } from './qmp.js';
import { emptyState, loadState, type QemuState, saveState } from './state.js';

/** A node as `query-named-block-nodes` reports it. */
export interface QsdNodeInfo {
  'node-name': string;
  drv: string;
  ro: boolean;
  /** The backing file the image names (even when we passed backing: null), and its recorded format. */
  image?: { 'backing-filename'?: string; 'backing-filename-format'?: string };
}

/** An export as `query-block-exports` reports it. */
interface QsdExportInfo {
  id: string;
  'node-name': string;
  type: string;
  'shutting-down': boolean;
}

/** A FUSE mount QSD made: fstype `fuse`, source `/dev/fuse`. */
export function isQsdMount(e: MountEntry | undefined): boolean {
  return e !== undefined && e.fstype === 'fuse' && e.source === '/dev/fuse';
}

/** block-export-del, then wait for BLOCK_EXPORT_DELETED (the unmount is done by then). */
export async function deleteExport(client: QmpClient, id: string, mode?: 'safe' | 'hard'): Promise<void> {
  const args = mode === undefined ? { id } : { id, mode };
  await client.executeAndWait('block-export-del', args, 'BLOCK_EXPORT_DELETED', (d) => d.id === id);
}

export interface SessionEvents {
  /** The QMP connection dropped without our asking (QSD died). */
  onLost?: (why: string) => void;
  /** What happened outside any step (re-attach, stale clean-up). */
  log?: (msg: string, fields?: Record<string, unknown>) => void;
}

export class QsdSession {
  /** What we applied to the daemon in `state.pid` (loaded on first use). */
  state: QemuState = emptyState();
  private client: QmpClient | undefined;
  private loaded = false;
  private stopping = false;

  constructor(
    readonly paths: QsdPaths,
    private readonly events: SessionEvents = {},
  ) {}

  /** The pid of the QSD this session talks to, if connected. */
  get pid(): number | undefined {
    return this.client?.isOpen ? this.state.pid : undefined;
  }

  private log(msg: string, fields?: Record<string, unknown>): void {
    this.events.log?.(msg, fields);
  }

  save(): Promise<void> {
    return saveState(this.paths.state, this.state);
  }

  private async load(): Promise<void> {
    if (this.loaded) return;
    this.state = await loadState(this.paths.state);
    this.loaded = true;
  }

  /**
   * The QMP connection: re-attaches to the running QSD, or (with `start`)
   * starts one. A daemon that died leaves stale mounts: they are cleaned
   * and the state emptied first, so the plan adds everything again.
   */
  async attach(start: boolean): Promise<QmpClient | undefined> {
    if (this.client?.isOpen) return this.client;
    if (this.stopping) throw new BlkError('AGENT', 'the qemu engine is shutting down');
    await this.load();
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
      if (!this.stopping) this.events.onLost?.('the QMP connection to qemu-storage-daemon closed');
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

  /** The connection to a running (or newly started) QSD. */
  async connected(): Promise<QmpClient> {
    return (await this.attach(true))!;
  }

  /** Forgets entries QSD no longer has (the plan adds them again); nothing when QSD is not running. */
  async refresh(): Promise<void> {
    const client = await this.attach(false);
    if (!client) return;
    const nodes = await client.execute<QsdNodeInfo[]>('query-named-block-nodes', { flat: true });
    const exports = await client.execute<QsdExportInfo[]>('query-block-exports');
    const haveNodes = new Set(nodes.map((n) => n['node-name']));
    const haveExports = new Set(exports.map((e) => e.id));
    const keptNodes = this.state.nodes.filter((n) => haveNodes.has(n.options['node-name']));
    const keptExports = this.state.exports.filter((e) => haveExports.has(e.options.id));
    if (keptNodes.length !== this.state.nodes.length || keptExports.length !== this.state.exports.length) {
      this.state.nodes = keptNodes;
      this.state.exports = keptExports;
      await this.save();
    }
  }

  /** Removes exports and nodes QSD has that the state does not know (a step whose record was lost). */
  private async removeOrphans(client: QmpClient): Promise<void> {
    const known = new Set(this.state.exports.map((e) => e.options.id));
    for (const e of await client.execute<QsdExportInfo[]>('query-block-exports')) {
      if (known.has(e.id)) continue;
      this.log('removing an export qemu-storage-daemon has but the state does not', { export: e.id });
      await deleteExport(client, e.id).catch(() => undefined);
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
      if (e.options.type !== 'fuse') continue;
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

  /** Quits QSD (it unmounts every export and closes every node), then forgets the state. */
  async shutdown(): Promise<void> {
    this.stopping = true;
    await this.load();
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
        if (e.createdMountpoint && e.options.type === 'fuse')
          await unlink(e.options.mountpoint).catch(() => undefined);
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
