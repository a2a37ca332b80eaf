/**
 * The host agent: level-triggered reconcile passes over a manifest directory.
 * Each pass is load → observe → plan → apply → record: it reads the manifests
 * fresh (last good version of invalid files), asks every engine what it has
 * (mounts, drift), makes one plan for all engines, carries it out, and records
 * each export's outcome. A full pass (start, resync timer, SIGHUP, POST
 * /reconcile, retries) looks at everything; an incremental pass (a watch event
 * naming manifest files) reads only those files and observes, plans and
 * records only the nodes and exports their change can touch (pass-scope.ts);
 * collisions and the export cap are still decided host-wide. A failing step marks only the exports it touches
 * `failed`; they are retried with backoff, or, for a terminal failure, when
 * their manifest or image changes. Events (file changes, SIGHUP, POST
 * /reconcile, the resync timer) only ask for a pass; never trusted for what
 * changed.
 */

import type { Engine } from '../engine/engine.js';
import { describeError } from '../errors.js';
import { NodeGraph } from '../manifest/graph.js';
import { type EngineName, mountpointOf } from '../manifest/types.js';
import { desiredFromManifests } from '../reconcile/desired.js';
import { type EnginePlanInput, planEngines } from '../reconcile/host-plan.js';
import type { Desired, Observed } from '../reconcile/model.js';
import { applyPlan, type StepFailure } from './apply.js';
import { ExportBook, type ExportRecord } from './export-status.js';
import { fingerprint } from './fingerprint.js';
import { DEFAULT_MAX_EXPORTS, exportsOverCap, IoErrorWatch, withoutExports } from './limits.js';
import type { Logger } from './log.js';
import { ManifestsInForce } from './manifest-cache.js';
import type { ManifestStatus } from './manifest-state.js';
import { desiredInScope, type PassScope, scopeOfChange } from './pass-scope.js';
import { refusedByRoots } from './paths.js';

export interface AgentConfig {
  manifests: string;
  hostname: string;
  /** Real paths of the allowed roots, or 'any' (--allow-any-path). */
  roots: readonly string[] | 'any';
  /** The engine of manifests that do not name one (--engine); default native. */
  defaultEngine?: EngineName;
  /** At most this many exports (--max-exports); default DEFAULT_MAX_EXPORTS. */
  maxExports?: number;
  /** The addresses the host NBD server listens on now (empty until its first export). */
  nbdAddresses?: () => string[];
}

export interface StatusExport {
  id: string;
  manifest: string;
  engine: string;
  state: ExportRecord['state'];
  reason: string;
  since: string;
  /** The export's type (fuse, nbd). */
  type: string;
  /** FUSE exports: the mountpoint (absent for NBD exports). */
  mountpoint?: string;
  /** NBD exports: the export name and the clients connected to it now. */
  nbd?: { name: string; connections: number };
  node: string;
  chain: string[];
  /** Served by this agent process since (ISO), when it serves it. */
  servedSince?: string;
  /** This agent process adopted it from a previous one (the mount itself is older). */
  adopted?: boolean;
  /** The kernel serves its reads and writes from the image file (FUSE passthrough); its counters miss them. */
  passthrough?: boolean;
}

export interface StatusDocument {
  agent: {
    pid: number;
    hostname: string;
    manifests: string;
    passes: number;
    lastPass: string | null;
    /** Where the host NBD server listens (unix:PATH, tcp:HOST:PORT), once it runs. */
    nbd?: string[];
  };
  manifests: ManifestStatus[];
  exports: StatusExport[];
}

export interface PassResult {
  steps: number;
  failed: number;
  durationMs: number;
}

/** The joined observed state of every engine, each entry tagged with its engine (GET /observed). */
export interface AgentObserved extends Observed {
  defaultEngine: EngineName;
}

export class Agent {
  private readonly manifests: ManifestsInForce;
  private readonly book = new ExportBook();
  private readonly ioErrors = new IoErrorWatch();
  private passes = 0;
  private lastPass: string | null = null;
  private running: Promise<PassResult> | undefined;
  private queued: Promise<PassResult> | undefined;
  /** What the next pass reads again: the files named by the requests since, or 'all'. */
  private wanted: Set<string> | 'all' | undefined;
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
  ) {
    this.manifests = new ManifestsInForce(config.manifests, config.hostname, log);
  }

  private get defaultEngine(): EngineName {
    return this.config.defaultEngine ?? 'native';
  }

  /**
   * Asks for a pass: a full one, or with `files` an incremental one for the
   * changes of those manifest files. Passes never overlap; requests during a
   * pass coalesce into one more (full if any of them asked for a full one).
   */
  requestPass(why: string, files?: readonly string[]): Promise<PassResult> {
    if (this.stopped) return Promise.resolve({ steps: 0, failed: 0, durationMs: 0 });
    if (files === undefined || this.wanted === 'all') this.wanted = 'all';
    else {
      this.wanted ??= new Set();
      for (const f of files) this.wanted.add(f);
    }
    if (!this.running) return this.startPass(why);
    this.queued ??= this.running.then(() => {
      this.queued = undefined;
      return this.startPass(why);
    });
    return this.queued;
  }

  private startPass(why: string): Promise<PassResult> {
    const wanted = this.wanted ?? 'all';
    this.wanted = undefined;
    this.running = this.pass(why, wanted === 'all' ? undefined : wanted).finally(() => {
      this.running = undefined;
    });
    return this.running;
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

  /**
   * Waits for the pass in progress and leaves every export to the next
   * agent: flushed, still mounted, its connection kept (native engine) or
   * its daemon left serving (qemu engine). The process exits afterwards.
   */
  async handover(): Promise<void> {
    this.stopped = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    await this.running?.catch(() => undefined);
    await this.queued?.catch(() => undefined);
    for (const engine of this.engines) await engine.handover();
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
        ...(this.config.nbdAddresses?.().length ? { nbd: this.config.nbdAddresses() } : {}),
      },
      manifests: this.manifests.status,
      exports: this.book.list().map((r) => {
        // A live export that keeps answering EIO is failed in status; it stays mounted for its good ranges.
        const stats = live.get(r.id)?.stats;
        const io = this.ioErrors.observe(r.id, stats?.errors, Date.now(), stats?.lastError);
        const failing = io !== undefined && r.state === 'ready';
        return {
          id: r.id,
          manifest: r.manifest,
          engine: this.engineOf.get(r.id) ?? this.defaultEngine,
          state: failing ? 'failed' : r.state,
          reason: failing ? io : r.reason,
          since: r.since,
          type: r.nbdName === undefined ? 'fuse' : 'nbd',
          ...(r.mountpoint !== undefined ? { mountpoint: r.mountpoint } : {}),
          ...(r.nbdName !== undefined
            ? { nbd: { name: r.nbdName, connections: live.get(r.id)?.connections ?? 0 } }
            : {}),
          node: r.node,
          chain: live.get(r.id)?.nodeChain ?? [],
          ...(live.get(r.id)?.servedSince !== undefined ? { servedSince: live.get(r.id)!.servedSince! } : {}),
          ...(live.has(r.id) ? { adopted: live.get(r.id)!.adopted } : {}),
          ...(live.get(r.id)?.stats?.passthrough ? { passthrough: true } : {}),
        };
      }),
    };
  }

  /** Every engine's observed state, joined and tagged with the engine (ids and node-names are unique across engines). */
  async observed(): Promise<AgentObserved> {
    const all: AgentObserved = { nodes: [], exports: [], defaultEngine: this.defaultEngine };
    for (const engine of this.engines) {
      const o = await engine.observe();
      all.nodes.push(...o.nodes.map((n) => ({ ...n, engine: engine.name })));
      all.exports.push(...o.exports.map((e) => ({ ...e, engine: engine.name })));
    }
    return all;
  }

  /** One pass: a full one, or with `files` an incremental one (see the header comment). */
  private async pass(why: string, files?: ReadonlySet<string>): Promise<PassResult> {
    const t0 = performance.now();
    const now = Date.now();
    let ok = true;
    let applied = 0;
    let failed = 0;
    try {
      // load
      const { inForce, changedExports, changedVersions } = this.manifests.load(files);
      // A manifest whose content in force changed gets its exports tried now, not after their backoff.
      for (const id of changedExports) this.book.retryNow(id);
      const all = desiredFromManifests(inForce, { hostname: this.config.hostname });
      this.trackExports(all, now, files === undefined);
      const scope = files === undefined ? undefined : scopeOfChange(changedVersions, all);
      if (scope && scope.nodes.size === 0 && scope.exports.size === 0)
        return this.finishPass(why, t0, 0, 0, true);
      await this.retryChangedImages(scope);
      const refused = await this.refusals(all, now, scope);
      // observe
      const inputs: EnginePlanInput[] = [];
      for (const engine of this.engines) {
        const ofEngine = desiredFromManifests(inForce, {
          hostname: this.config.hostname,
          engine: { name: engine.name, fallback: this.defaultEngine },
        });
        const desired = withoutExports(
          scope ? desiredInScope(ofEngine, scope) : ofEngine,
          new Set(refused.exports.keys()),
          refused.nodes,
        );
        for (const e of desired.exports) this.engineOf.set(e.options.id, engine.name);
        try {
          const observed = await engine.observe(scope);
          for (const n of observed.nodes)
            if (n.drift !== undefined)
              this.log.warn('image changed under a live node; replacing', {
                node: n.options['node-name'],
                reason: n.drift,
              });
          inputs.push({ caps: engine.capabilities, desired, observed });
        } catch (e) {
          failed += this.engineUnavailable(engine, desired, e, now);
        }
      }
      // plan, apply
      const desired: Desired = {
        nodes: inputs.flatMap((i) => i.desired.nodes),
        exports: inputs.flatMap((i) => i.desired.exports),
      };
      const waiting = (id: string) => this.book.inBackoff(id, now);
      const result = await applyPlan(planEngines(inputs), this.engines, desired, waiting, this.log);
      applied = result.applied;
      const failedNow = await this.recordFailures(result.failures, desired, now);
      failed += failedNow.size;
      // record
      await this.recordOutcome(inputs, failedNow, now, scope);
      this.scheduleRetry();
    } catch (e) {
      ok = false;
      this.log.error('reconcile pass failed', { why, error: describeError(e) });
    }
    return this.finishPass(why, t0, applied, failed, ok);
  }

  private finishPass(_why: string, t0: number, steps: number, failed: number, ok: boolean): PassResult {
    this.passes++;
    this.lastPass = new Date().toISOString();
    const result = { steps, failed, durationMs: performance.now() - t0 };
    this.onPass?.(result, ok);
    return result;
  }

  private trackExports(all: Desired, now: number, full: boolean): void {
    for (const e of all.exports)
      this.book.track(
        e.options.id,
        e.origin.manifest,
        mountpointOf(e.options),
        e.options['node-name'],
        now,
        e.options.type === 'nbd' ? e.options.name : undefined,
      );
    this.book.retain(new Set(all.exports.map((e) => e.options.id)));
    if (full) this.engineOf.clear();
  }

  /** Terminal failures (in scope) whose image or mountpoint changed are tried again now. */
  private async retryChangedImages(scope: PassScope | undefined): Promise<void> {
    for (const r of this.book.terminal()) {
      if (scope && !scope.exports.has(r.id)) continue;
      if ((await fingerprint(r.terminal!.files)) !== r.terminal!.fingerprint) this.book.retryNow(r.id);
    }
  }

  /**
   * Exports refused before planning (over --max-exports, outside the roots),
   * marked failed; nodes of refused images. The cap counts every export of
   * the host; the roots are checked for the exports in scope.
   */
  private async refusals(
    all: Desired,
    now: number,
    scope: PassScope | undefined,
  ): Promise<{ exports: Map<string, string>; nodes: Set<string> }> {
    const served = new Set(this.engines.flatMap((en) => en.exportIds()));
    const max = this.config.maxExports ?? DEFAULT_MAX_EXPORTS;
    const exports = exportsOverCap(
      all.exports.map((e) => e.options.id),
      served,
      max,
    );
    const confined = await refusedByRoots(scope ? desiredInScope(all, scope) : all, this.config.roots);
    for (const [id, why] of confined.exports) exports.set(id, why);
    for (const [id, why] of exports) {
      const before = this.book.get(id);
      if (before?.state === 'failed' && before.reason === why) continue;
      this.log.error('export refused', { export: id, reason: why });
      this.book.failed(id, why, now);
    }
    return { exports, nodes: confined.nodes };
  }

  /** An engine that cannot even observe (its daemon will not start) fails only its own exports. */
  private engineUnavailable(engine: Engine, desired: Desired, e: unknown, now: number): number {
    const reason = `${engine.name} engine: ${describeError(e)}`;
    if (desired.exports.length === 0) this.log.error('engine unavailable', { reason });
    for (const x of desired.exports) {
      if (this.book.get(x.options.id)?.state !== 'failed')
        this.log.error('export failed', { export: x.options.id, engine: engine.name, reason });
      this.book.failed(x.options.id, reason, now);
    }
    return desired.exports.length;
  }

  /** Marks the exports of failed steps failed (terminal ones watch their files); returns their ids. */
  private async recordFailures(failures: StepFailure[], desired: Desired, now: number): Promise<Set<string>> {
    const failed = new Set<string>();
    const graph = new NodeGraph(desired.nodes.map((n) => n.options));
    const exportById = new Map(desired.exports.map((e) => [e.options.id, e.options]));
    for (const f of failures) {
      for (const id of f.exports) {
        if (failed.has(id) || !this.book.get(id)) continue;
        failed.add(id);
        const e = exportById.get(id);
        let terminal: { files: string[]; fingerprint: string } | undefined;
        if (f.terminal && e) {
          const files = graph
            .below(e['node-name'])
            .map((n) => graph.get(n)?.filename)
            .filter((p): p is string => p !== undefined);
          if (e.type === 'fuse') files.push(e.mountpoint);
          terminal = { files, fingerprint: await fingerprint(files) };
        }
        this.book.failed(
          id,
          terminal ? `${f.reason} (retried when its manifest or image changes)` : f.reason,
          now,
          terminal,
        );
        const r = this.book.get(id)!;
        this.log.error('export failed', {
          export: id,
          reason: f.reason,
          ...(terminal ? { retry: 'when its manifest or image changes' } : { retryInMs: r.retryAt - now }),
        });
      }
    }
    return failed;
  }

  /** Outcome per desired export, from what the engines report now. */
  private async recordOutcome(
    inputs: EnginePlanInput[],
    failedNow: Set<string>,
    now: number,
    scope: PassScope | undefined,
  ): Promise<void> {
    const mounted = new Set<string>();
    for (const i of inputs) {
      const engine = this.engines.find((e) => e.name === i.caps.engine)!;
      const after = await engine.observe(scope).catch(() => ({ exports: [] as Observed['exports'] }));
      for (const e of after.exports) if (e.state === 'mounted') mounted.add(e.options.id);
    }
    for (const e of inputs.flatMap((i) => i.desired.exports)) {
      const id = e.options.id;
      if (failedNow.has(id)) continue;
      if (mounted.has(id)) {
        if (this.book.get(id)?.state !== 'ready')
          this.log.info('export ready', {
            export: id,
            ...(e.options.type === 'fuse' ? { mountpoint: e.options.mountpoint } : { nbd: e.options.name }),
          });
        this.book.ready(id, Date.now());
      } else if (!this.book.inBackoff(id, now)) {
        this.book.pending(id, 'waiting for a pass', Date.now());
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
