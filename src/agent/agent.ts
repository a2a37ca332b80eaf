/**
 * The host agent: level-triggered reconcile passes over a manifest directory.
 * Each pass reads the manifests fresh, decides what is in force (last good
 * version of invalid files), observes the engine and the kernel's mount
 * table, diffs, and applies the plan step by step. A failing step marks only
 * the exports it touches `failed` and retries them with backoff; the others
 * proceed. Events (file changes, SIGHUP, POST /reconcile, the resync timer)
 * only ask for a pass; they are never trusted for what changed.
 */

import type { Engine } from '../engine/engine.js';
import { describeError } from '../errors.js';
import { listManifestFiles } from '../manifest/directory.js';
import type { EngineName, ManifestFile } from '../manifest/types.js';
import { desiredFromManifests } from '../reconcile/desired.js';
import { diff } from '../reconcile/diff.js';
import type { Desired, NodeOptions, Observed, Plan, Step } from '../reconcile/model.js';
import { ExportBook, type ExportRecord } from './export-status.js';
import { DEFAULT_MAX_EXPORTS, exportsOverCap, IoErrorWatch, withoutExports } from './limits.js';
import type { Logger } from './log.js';
import { ManifestCache } from './manifest-cache.js';
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
  /** The engine of manifests that do not name one (--engine); default native. */
  defaultEngine?: EngineName;
  /** At most this many exports (--max-exports); default DEFAULT_MAX_EXPORTS. */
  maxExports?: number;
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

/** node-name → options of a desired state, built once per Desired (chainIn runs per export). */
const nodeIndex = new WeakMap<Desired, Map<string, Desired['nodes'][number]['options']>>();

/** Node-names an export depends on, from the desired graph (export node down through file/backing). */
function chainIn(desired: Desired, nodeName: string): string[] {
  let byName = nodeIndex.get(desired);
  if (!byName) {
    byName = new Map(desired.nodes.map((n) => [n.options['node-name'], n.options]));
    nodeIndex.set(desired, byName);
  }
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

/** The manifest files with only the documents served by `engine` (absent engine: `fallback`). */
function filesForEngine(
  files: readonly ManifestFile[],
  engine: string,
  fallback: EngineName,
): ManifestFile[] {
  return files.map((f) => ({
    ...f,
    documents: f.documents.filter((d) => (d.engine ?? fallback) === engine),
  }));
}

/** Removal steps come first in every plan (diff's order); they run for every engine before anything is added. */
function isRemoval(step: Step): boolean {
  return step.action === 'remove-export' || step.action === 'remove-node';
}

/** What one pass does with one engine. */
interface EnginePass {
  engine: Engine;
  desired: Desired;
  plan: Plan;
}

export class Agent {
  private manifestState: ManifestState = EMPTY_MANIFEST_STATE;
  private manifestStatus: ManifestStatus[] = [];
  private readonly book = new ExportBook();
  private readonly manifestCache = new ManifestCache();
  private previousInForce = new Map<string, ManifestFile>();
  private readonly ioErrors = new IoErrorWatch();
  private passes = 0;
  private lastPass: string | null = null;
  private running: Promise<PassResult> | undefined;
  private queued: Promise<PassResult> | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** The engine that serves each desired export (from the last pass). */
  private readonly engineOf = new Map<string, string>();
  /** Called after every pass (metrics). */
  onPass: ((r: PassResult, ok: boolean) => void) | undefined;

  constructor(
    private readonly config: AgentConfig,
    readonly engines: readonly Engine[],
    private readonly log: Logger,
  ) {}

  private get defaultEngine(): EngineName {
    return this.config.defaultEngine ?? 'native';
  }

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
    let first: unknown;
    for (const engine of this.engines) {
      try {
        await engine.shutdown();
      } catch (e) {
        first ??= e;
      }
    }
    if (first !== undefined) throw first;
  }

  status(): StatusDocument {
    const live = new Map(this.engines.flatMap((en) => en.exports().map((e) => [e.id, e] as const)));
    return {
      agent: {
        pid: process.pid,
        hostname: this.config.hostname,
        manifests: this.config.manifests,
        passes: this.passes,
        lastPass: this.lastPass,
      },
      manifests: this.manifestStatus,
      exports: this.book.list().map((r) => {
        // A live export that keeps answering EIO is failed in status; it stays mounted for its good ranges.
        const io = this.ioErrors.observe(r.id, live.get(r.id)?.stats?.errors, Date.now());
        const failing = io !== undefined && r.state === 'ready';
        return {
          id: r.id,
          manifest: r.manifest,
          engine: this.engineOf.get(r.id) ?? this.defaultEngine,
          state: failing ? 'failed' : r.state,
          reason: failing ? io : r.reason,
          since: r.since,
          mountpoint: r.mountpoint,
          node: r.node,
          chain: live.get(r.id)?.nodeChain ?? [],
        };
      }),
    };
  }

  /** Every engine's observed state, as one (ids and node-names are unique across manifests, so across engines). */
  async observed(): Promise<Observed> {
    const all: Observed = { nodes: [], exports: [] };
    for (const engine of this.engines) {
      const o = await engine.observe();
      all.nodes.push(...o.nodes);
      all.exports.push(...o.exports);
    }
    return all;
  }

  /** Reads every manifest of the directory; a directory that cannot be read keeps the previous state. */
  private loadManifests(): ManifestFile[] | undefined {
    try {
      return this.manifestCache.load(listManifestFiles(this.config.manifests));
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
    // Each distinct path is resolved once per pass, all at once (many exports share an image).
    const roots = this.config.roots;
    const paths = new Set<string>();
    for (const n of desired.nodes) if (n.options.filename !== undefined) paths.add(n.options.filename);
    for (const e of desired.exports) paths.add(e.options.mountpoint);
    const verdicts = new Map(
      await Promise.all([...paths].map(async (p) => [p, await outsideRoots(p, roots)] as const)),
    );
    const badNodes = new Map<string, string>();
    for (const n of desired.nodes) {
      if (n.options.filename === undefined) continue;
      const why = verdicts.get(n.options.filename);
      if (why) badNodes.set(n.options['node-name'], `image ${why}`);
    }
    const badExports = new Map<string, string>();
    for (const e of desired.exports) {
      const why = verdicts.get(e.options.mountpoint);
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
  private async evictDrifted(engine: Engine, observed: Observed): Promise<boolean> {
    const drifted = (await engine.driftedNodes?.()) ?? [];
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
          await engine.apply({ action: 'remove-export', export: e.options });
      }
      for (const name of [...above.reverse(), d.nodeName]) {
        const n = observed.nodes.find((x) => x.options['node-name'] === name);
        if (n) await engine.apply({ action: 'remove-node', node: n.options as NodeOptions });
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
      // A manifest whose content in force changed gets its exports tried now, not after their backoff.
      for (const f of inForce) {
        if (this.previousInForce.get(f.file) === f) continue;
        for (const d of f.documents) for (const e of d.exports) this.book.retryNow(e.options.id);
      }
      this.previousInForce = new Map(inForce.map((f) => [f.file, f]));
      const all = desiredFromManifests(inForce, this.config.hostname);
      for (const e of all.exports) {
        this.book.track(e.options.id, e.origin.manifest, e.options.mountpoint, e.options['node-name'], now);
      }
      this.book.retain(new Set(all.exports.map((e) => e.options.id)));
      this.engineOf.clear();
      const served = new Set(this.engines.flatMap((en) => en.exports().map((e) => e.id)));
      const overCap = exportsOverCap(
        all.exports.map((e) => e.options.id),
        served,
        this.config.maxExports ?? DEFAULT_MAX_EXPORTS,
      );
      for (const [id, why] of overCap) {
        const before = this.book.get(id);
        if (before?.state === 'failed' && before.reason === why) continue;
        this.log.error('export refused', { export: id, reason: why });
        this.book.failed(id, why, now);
      }

      // Each engine gets its own desired subset and its own observed state; the same diff for all.
      const passes: EnginePass[] = [];
      const desiredExports: Desired['exports'] = [];
      for (const engine of this.engines) {
        let desired = desiredFromManifests(
          filesForEngine(inForce, engine.name, this.defaultEngine),
          this.config.hostname,
        );
        for (const e of desired.exports) this.engineOf.set(e.options.id, engine.name);
        desired = await this.confine(withoutExports(desired, new Set(overCap.keys())), now);
        try {
          let observed = await engine.observe();
          // Image files replaced under live nodes are looked for on every pass but the ones a
          // manifest edit triggers (those should follow the edit as fast as they can).
          if (why !== 'manifest change' && (await this.evictDrifted(engine, observed)))
            observed = await engine.observe();
          passes.push({ engine, desired, plan: diff(desired, observed) });
          desiredExports.push(...desired.exports);
        } catch (e) {
          // An engine that cannot even observe (its daemon will not start) fails only its own exports.
          const reason = `${engine.name} engine: ${describeError(e)}`;
          if (desired.exports.length === 0) this.log.error('engine unavailable', { reason });
          for (const x of desired.exports) {
            if (this.book.get(x.options.id)?.state !== 'failed')
              this.log.error('export failed', { export: x.options.id, engine: engine.name, reason });
            this.book.failed(x.options.id, reason, now);
            failedCount++;
          }
        }
      }
      const failedThisPass = new Set<string>();
      const counts = { applied: 0, failed: failedCount };
      // Removals everywhere first, so an export moving between engines frees its mountpoint before it is added.
      for (const p of passes)
        await this.applySteps(p, p.plan.steps.filter(isRemoval), now, failedThisPass, counts);
      for (const p of passes)
        await this.applySteps(
          p,
          p.plan.steps.filter((s) => !isRemoval(s)),
          now,
          failedThisPass,
          counts,
        );
      applied = counts.applied;
      failedCount = counts.failed;

      // Outcome per desired export, from what the engines report now.
      const mounted = new Set<string>();
      for (const p of passes) {
        const after = await p.engine.observe().catch(() => ({ exports: [] as Observed['exports'] }));
        for (const e of after.exports) if (e.state === 'mounted') mounted.add(e.options.id);
      }
      for (const e of desiredExports) {
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

  /**
   * Applies `steps` of one engine's plan in order. A failing step fails only
   * the exports it touches (and, in this pass, whatever is built on its node).
   */
  private async applySteps(
    p: EnginePass,
    steps: readonly Step[],
    now: number,
    failedThisPass: Set<string>,
    counts: { applied: number; failed: number },
  ): Promise<void> {
    const { engine, desired } = p;
    // Which desired exports each node serves; a node step that fails fails them.
    const usersOf = new Map<string, string[]>();
    for (const e of desired.exports) {
      for (const n of chainIn(desired, e.options['node-name']))
        usersOf.set(n, [...(usersOf.get(n) ?? []), e.options.id]);
    }
    const waiting = (id: string) => this.book.inBackoff(id, now);
    const brokenNodes = new Map<string, string>();
    const fail = (ids: string[], reason: string) => {
      for (const id of ids) {
        if (failedThisPass.has(id) || !this.book.get(id)) continue;
        failedThisPass.add(id);
        this.book.failed(id, reason, now);
        counts.failed++;
        this.log.error('export failed', {
          export: id,
          engine: engine.name,
          reason,
          retryInMs: this.book.get(id)!.retryAt - now,
        });
      }
    };
    for (const step of steps) {
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
        await engine.apply(step);
        counts.applied++;
        this.log.info('applied', {
          step: step.action,
          ...(node ? { node } : {}),
          ...(exportId ? { export: exportId } : {}),
          ...(engine.name !== 'native' ? { engine: engine.name } : {}),
        });
      } catch (e) {
        const reason = `${step.action}${node ? ` ${node}` : exportId ? ` ${exportId}` : ''}: ${describeError(e)}`;
        if (node && step.action !== 'remove-node') brokenNodes.set(node, reason);
        if (exportsTouched.length) fail(exportsTouched, reason);
        else this.log.error('step failed', { step: step.action, engine: engine.name, reason });
      }
    }
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
