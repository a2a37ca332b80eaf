/**
 * The host agent: level-triggered reconcile passes over a manifest directory.
 * Each pass reads the manifests fresh, decides what is in force (last good
 * version of invalid files), observes the engine and the kernel's mount
 * table, diffs, and applies the plan step by step. A failing step marks only
 * the exports it touches `failed` and retries them with backoff; the others
 * proceed. Events (file changes, SIGHUP, POST /reconcile, the resync timer)
 * only ask for a pass; they are never trusted for what changed.
 */

import type { NativeEngine } from '../engine/native/engine.js';
import { describeError } from '../errors.js';
import { listManifestFiles } from '../manifest/directory.js';
import { loadManifestFile } from '../manifest/load.js';
import type { ManifestFile } from '../manifest/types.js';
import { desiredFromManifests } from '../reconcile/desired.js';
import { diff } from '../reconcile/diff.js';
import type { Desired, NodeOptions, Observed, Step } from '../reconcile/model.js';
import { ExportBook, type ExportRecord } from './export-status.js';
import type { Logger } from './log.js';
import {
  EMPTY_MANIFEST_STATE,
  type ManifestState,
  type ManifestStatus,
  resolveManifests,
} from './manifest-state.js';
import { outsideRoots } from './paths.js';

export interface AgentConfig {
  manifests: string;
  hostname: string;
  /** Real paths of the allowed roots, or 'any' (--allow-any-path). */
  roots: readonly string[] | 'any';
}

export interface StatusExport {
  id: string;
  manifest: string;
  engine: string;
  state: ExportRecord['state'];
  reason: string;
  since: string;
  mountpoint: string;
  node: string;
  chain: string[];
}

export interface StatusDocument {
  agent: { pid: number; hostname: string; manifests: string; passes: number; lastPass: string | null };
  manifests: ManifestStatus[];
  exports: StatusExport[];
}

export interface PassResult {
  steps: number;
  failed: number;
  durationMs: number;
}

/** Node-names an export depends on, from the desired graph (export node down through file/backing). */
function chainIn(desired: Desired, nodeName: string): string[] {
  const byName = new Map(desired.nodes.map((n) => [n.options['node-name'], n.options]));
  const out: string[] = [];
  const visit = (name: string) => {
    if (out.includes(name)) return;
    out.push(name);
    const n = byName.get(name);
    if (!n) return;
    if (n.file) visit(n.file);
    if (typeof n.backing === 'string') visit(n.backing);
  };
  visit(nodeName);
  return out;
}

function stepNodeName(step: Step): string | undefined {
  return 'node' in step ? step.node['node-name'] : undefined;
}

export class Agent {
  private manifestState: ManifestState = EMPTY_MANIFEST_STATE;
  private manifestStatus: ManifestStatus[] = [];
  private readonly book = new ExportBook();
  private passes = 0;
  private lastPass: string | null = null;
  private running: Promise<PassResult> | undefined;
  private queued: Promise<PassResult> | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** Called after every pass (metrics). */
  onPass: ((r: PassResult, ok: boolean) => void) | undefined;

  constructor(
    private readonly config: AgentConfig,
    readonly engine: NativeEngine,
    private readonly log: Logger,
  ) {}

  /** Asks for a pass; passes never overlap, and requests during a pass coalesce into one more. */
  requestPass(why: string): Promise<PassResult> {
    if (this.stopped) return Promise.resolve({ steps: 0, failed: 0, durationMs: 0 });
    if (!this.running) {
      this.running = this.pass(why).finally(() => {
        this.running = undefined;
      });
      return this.running;
    }
    this.queued ??= this.running.then(() => {
      this.queued = undefined;
      return this.requestPass(why);
    });
    return this.queued;
  }

  /** Waits for the pass in progress, then removes every export and closes every node. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    await this.running?.catch(() => undefined);
    await this.queued?.catch(() => undefined);
    await this.engine.shutdown();
  }

  status(): StatusDocument {
    const live = new Map(this.engine.exports().map((e) => [e.id, e]));
    return {
      agent: {
        pid: process.pid,
        hostname: this.config.hostname,
        manifests: this.config.manifests,
        passes: this.passes,
        lastPass: this.lastPass,
      },
      manifests: this.manifestStatus,
      exports: this.book.list().map((r) => ({
        id: r.id,
        manifest: r.manifest,
        engine: this.engine.name,
        state: r.state,
        reason: r.reason,
        since: r.since,
        mountpoint: r.mountpoint,
        node: r.node,
        chain: live.get(r.id)?.nodeChain ?? [],
      })),
    };
  }

  observed(): Promise<Observed> {
    return this.engine.observe();
  }

  /** Reads every manifest of the directory; a directory that cannot be read keeps the previous state. */
  private loadManifests(): ManifestFile[] | undefined {
    try {
      return listManifestFiles(this.config.manifests).map((f) => loadManifestFile(f));
    } catch (e) {
      this.log.error('cannot read the manifest directory; keeping the state in force', {
        dir: this.config.manifests,
        error: describeError(e),
      });
      return undefined;
    }
  }

  /** Drops exports (and nodes only they need) whose paths leave the allowed roots; marks them failed. */
  private async confine(desired: Desired, now: number): Promise<Desired> {
    if (this.config.roots === 'any') return desired;
    const badNodes = new Map<string, string>();
    for (const n of desired.nodes) {
      if (n.options.filename === undefined) continue;
      const why = await outsideRoots(n.options.filename, this.config.roots);
      if (why) badNodes.set(n.options['node-name'], `image ${why}`);
    }
    const badExports = new Map<string, string>();
    for (const e of desired.exports) {
      const why = await outsideRoots(e.options.mountpoint, this.config.roots);
      if (why) {
        badExports.set(e.options.id, `mountpoint ${why}`);
        continue;
      }
      const bad = chainIn(desired, e.options['node-name']).find((n) => badNodes.has(n));
      if (bad) badExports.set(e.options.id, badNodes.get(bad)!);
    }
    for (const [id, why] of badExports) {
      const before = this.book.get(id);
      if (before?.state !== 'failed' || before.reason !== why)
        this.log.error('export refused', { export: id, reason: why });
      this.book.failed(id, why, now);
    }
    const nodesOfBad = new Set<string>(badNodes.keys());
    const keptExports = desired.exports.filter((e) => !badExports.has(e.options.id));
    const needed = new Set(keptExports.flatMap((e) => chainIn(desired, e.options['node-name'])));
    for (const e of desired.exports) {
      if (badExports.has(e.options.id))
        for (const n of chainIn(desired, e.options['node-name'])) nodesOfBad.add(n);
    }
    return {
      exports: keptExports,
      nodes: desired.nodes.filter(
        (n) => !nodesOfBad.has(n.options['node-name']) || needed.has(n.options['node-name']),
      ),
    };
  }

  /** Removes exports and nodes above file nodes whose image was replaced, so the plan adds them again. */
  private async evictDrifted(observed: Observed): Promise<boolean> {
    const drifted = await this.engine.driftedNodes();
    if (drifted.length === 0) return false;
    const parentsOf = (name: string) =>
      observed.nodes
        .filter((n) => n.options.file === name || n.options.backing === name)
        .map((n) => n.options['node-name']);
    for (const d of drifted) {
      const above: string[] = [];
      const walk = (name: string) => {
        for (const p of parentsOf(name)) {
          if (!above.includes(p)) {
            above.push(p);
            walk(p);
          }
        }
      };
      walk(d.nodeName);
      const gone = new Set([d.nodeName, ...above]);
      this.log.warn('image changed under a live node; replacing', { node: d.nodeName, reason: d.reason });
      for (const e of observed.exports) {
        if (gone.has(e.options['node-name']))
          await this.engine.apply({ action: 'remove-export', export: e.options });
      }
      for (const name of [...above.reverse(), d.nodeName]) {
        const n = observed.nodes.find((x) => x.options['node-name'] === name);
        if (n) await this.engine.apply({ action: 'remove-node', node: n.options as NodeOptions });
      }
    }
    return true;
  }

  private async pass(why: string): Promise<PassResult> {
    const t0 = performance.now();
    const now = Date.now();
    let ok = true;
    let applied = 0;
    let failedCount = 0;
    try {
      const fresh = this.loadManifests();
      if (fresh) {
        const mp = resolveManifests(fresh, this.manifestState, this.config.hostname);
        this.manifestState = mp.next;
        for (const s of mp.status) {
          const before = this.manifestStatus.find((x) => x.file === s.file);
          if (!s.valid && JSON.stringify(before?.errors) !== JSON.stringify(s.errors)) {
            for (const e of s.errors) {
              this.log.error(`${e.file}${e.line !== null ? `:${e.line}:${e.col}` : ''}: ${e.message}`, {
                manifest: s.file,
                lastGoodInForce: s.lastGoodInForce,
              });
            }
          }
        }
        this.manifestStatus = mp.status;
      }
      const inForce = [...this.manifestState.lastGood.values()];
      let desired = desiredFromManifests(inForce, this.config.hostname);
      for (const e of desired.exports) {
        this.book.track(e.options.id, e.origin.manifest, e.options.mountpoint, e.options['node-name'], now);
      }
      this.book.retain(new Set(desired.exports.map((e) => e.options.id)));
      desired = await this.confine(desired, now);

      let observed = await this.engine.observe();
      if (await this.evictDrifted(observed)) observed = await this.engine.observe();
      const plan = diff(desired, observed);

      // Which desired exports each node serves; a node step that fails fails them.
      const usersOf = new Map<string, string[]>();
      for (const e of desired.exports) {
        for (const n of chainIn(desired, e.options['node-name']))
          usersOf.set(n, [...(usersOf.get(n) ?? []), e.options.id]);
      }
      const waiting = (id: string) => this.book.inBackoff(id, now);
      const brokenNodes = new Map<string, string>();
      const failedThisPass = new Set<string>();
      const fail = (ids: string[], reason: string) => {
        for (const id of ids) {
          if (failedThisPass.has(id) || !this.book.get(id)) continue;
          failedThisPass.add(id);
          this.book.failed(id, reason, now);
          failedCount++;
          this.log.error('export failed', {
            export: id,
            reason,
            retryInMs: this.book.get(id)!.retryAt - now,
          });
        }
      };
      for (const step of plan.steps) {
        const node = stepNodeName(step);
        const exportId = 'export' in step ? step.export.id : undefined;
        const exportsTouched = exportId !== undefined ? [exportId] : (usersOf.get(node!) ?? []);
        // Additions for exports that wait for their retry are left for a later pass.
        if (
          (step.action === 'add-node' || step.action === 'add-export' || step.action === 'repair-export') &&
          exportsTouched.length > 0 &&
          exportsTouched.every(waiting)
        ) {
          continue;
        }
        const blockedBy =
          step.action === 'add-node'
            ? [step.node.file, typeof step.node.backing === 'string' ? step.node.backing : undefined].find(
                (c) => c !== undefined && brokenNodes.has(c),
              )
            : step.action === 'add-export' && brokenNodes.has(step.export['node-name'])
              ? step.export['node-name']
              : undefined;
        if (blockedBy !== undefined) {
          if (node) brokenNodes.set(node, brokenNodes.get(blockedBy)!);
          fail(exportsTouched, brokenNodes.get(blockedBy)!);
          continue;
        }
        try {
          await this.engine.apply(step);
          applied++;
          this.log.info('applied', {
            step: step.action,
            ...(node ? { node } : {}),
            ...(exportId ? { export: exportId } : {}),
          });
        } catch (e) {
          const reason = `${step.action}${node ? ` ${node}` : exportId ? ` ${exportId}` : ''}: ${describeError(e)}`;
          if (node && step.action !== 'remove-node') brokenNodes.set(node, reason);
          if (exportsTouched.length) fail(exportsTouched, reason);
          else this.log.error('step failed', { step: step.action, reason });
        }
      }

      // Outcome per desired export, from what the engine reports now.
      const after = await this.engine.observe();
      const mounted = new Set(after.exports.filter((e) => e.state === 'mounted').map((e) => e.options.id));
      for (const e of desired.exports) {
        const id = e.options.id;
        if (failedThisPass.has(id)) continue;
        if (mounted.has(id)) {
          const before = this.book.get(id);
          if (before?.state !== 'ready')
            this.log.info('export ready', { export: id, mountpoint: e.options.mountpoint });
          this.book.ready(id, Date.now());
        } else if (!this.book.inBackoff(id, now)) {
          this.book.pending(id, 'waiting for a pass', Date.now());
        }
      }
      this.scheduleRetry();
    } catch (e) {
      ok = false;
      this.log.error('reconcile pass failed', { why, error: describeError(e) });
    }
    this.passes++;
    this.lastPass = new Date().toISOString();
    const result = { steps: applied, failed: failedCount, durationMs: performance.now() - t0 };
    this.onPass?.(result, ok);
    return result;
  }

  private scheduleRetry(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = undefined;
    const next = this.book.nextRetry(Date.now());
    if (next === undefined || this.stopped) return;
    this.retryTimer = setTimeout(() => void this.requestPass('retry'), Math.max(0, next - Date.now()) + 10);
    this.retryTimer.unref();
  }
}
