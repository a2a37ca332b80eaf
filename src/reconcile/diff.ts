/**
 * The plan from one engine's observed state to its desired state. Pure: no
 * I/O, no clock, inputs not mutated; the same inputs give the same plan. The
 * plan is the only place that decides what happens: which nodes are open
 * read-write (writability.ts), what is reopened in place and what replaced
 * (the engine's capabilities), what drifted. Engines carry steps out.
 *
 * Order of steps, and why:
 *   1. remove-export   exports go before the nodes under them (flush, unmount)
 *   2. remove-node     top-down, so no node is closed under a parent
 *   3. reopen-export   that take rights away (writable → false), before nodes turn read-only
 *   4. reopen-node     to read-only top-down, then to writable bottom-up
 *   5. reopen-export   the others, once their nodes allow it
 *   6. add-node        bottom-up: children before parents
 *   7. add-export      on complete graphs
 *   7. adopt-export    serve a connection a previous agent left held, once its nodes are open
 *   8. repair-export   remount stale or vanished mounts, with the desired options
 * A replaced node is removed and added again, and so is everything above it
 * in the observed graph (parent nodes, exports on any of them).
 */
import { NodeGraph } from '../manifest/graph.js';
import { mountpointOf } from '../manifest/types.js';
import { changedReason, compareExports, compareNodes } from './compare.js';
import type {
  Change,
  Desired,
  DesiredExport,
  DesiredNode,
  EngineCapabilities,
  Observed,
  ObservedExport,
  ObservedNode,
  Plan,
  PlanSummary,
  Replacement,
  Step,
} from './model.js';
import { deriveWritability } from './writability.js';

/** Everything one diff looks at, indexed once. */
interface Inputs {
  caps: EngineCapabilities;
  desired: Desired;
  observed: Observed;
  want: Map<string, DesiredNode>;
  have: Map<string, ObservedNode>;
  wantExports: Map<string, DesiredExport>;
  haveExports: Map<string, ObservedExport>;
}

/** What happens to nodes. */
interface NodeChanges {
  replaced: Map<string, Replacement>;
  reopened: Map<string, Change[]>;
  /** Removed or replaced: closed in this plan. */
  gone: Set<string>;
}

/** What happens to exports that stay desired. */
interface ExportChanges {
  replaced: Map<string, Replacement>;
  reopened: Map<string, Change[]>;
  repaired: Step[];
  adopted: Step[];
}

/** The plan that takes one engine's `observed` state to `desired`, within what `caps` allow in place. */
export function diff(desired: Desired, observed: Observed, caps: EngineCapabilities): Plan {
  const d = deriveWritability(desired);
  const inputs: Inputs = {
    caps,
    desired: d,
    observed,
    want: new Map(d.nodes.map((n) => [n.options['node-name'], n])),
    have: new Map(observed.nodes.map((n) => [n.options['node-name'], n])),
    wantExports: new Map(d.exports.map((e) => [e.options.id, e])),
    haveExports: new Map(observed.exports.map((e) => [e.options.id, e])),
  };
  const nodes = nodeChanges(inputs);
  return orderSteps(inputs, nodes, exportChanges(inputs, nodes));
}

/** Nodes replaced (own change, drift, or a child's replacement), reopened in place, or closed. */
function nodeChanges(x: Inputs): NodeChanges {
  const replaced = new Map<string, Replacement>();
  const reopened = new Map<string, Change[]>();
  for (const [name, d] of x.want) {
    const o = x.have.get(name);
    if (!o) continue;
    const { mutable, immutable } = compareNodes(o.options, d.options, x.caps.nodeMutable(d.options.driver));
    if (o.drift !== undefined) replaced.set(name, { reason: o.drift, changes: [...immutable, ...mutable] });
    else if (immutable.length > 0)
      replaced.set(name, { reason: changedReason(immutable), changes: [...immutable, ...mutable] });
    else if (mutable.length > 0) reopened.set(name, mutable);
  }
  // Everything above a replaced node in the observed graph goes with it.
  const observedGraph = new NodeGraph(x.observed.nodes.map((n) => n.options));
  for (const [name, edge] of observedGraph.above([...replaced.keys()])) {
    if (!x.want.has(name) || replaced.has(name)) continue;
    replaced.set(name, { reason: `${edge.role} ${edge.name} replaced`, changes: [] });
    reopened.delete(name);
  }
  const gone = new Set(replaced.keys());
  for (const o of x.observed.nodes) if (!x.want.has(o.options['node-name'])) gone.add(o.options['node-name']);
  return { replaced, reopened, gone };
}

/** File nodes reopened in this plan, by filename (for engines that cannot reopen under their own mount). */
function reopenedFiles(x: Inputs, nodes: NodeChanges): Map<string, string> {
  const out = new Map<string, string>();
  if (x.caps.reopenUnderOwnMount) return out;
  for (const name of nodes.reopened.keys()) {
    const n = x.want.get(name)!.options;
    if (n.driver === 'file' && n.filename !== undefined) out.set(n.filename, name);
  }
  return out;
}

/** Why an export whose own options changed is replaced. */
function exportReplaceReason(x: Inputs, type: string, immutable: Change[]): string {
  const reason = changedReason(immutable);
  const remounted = x.caps.exportRemounted?.(type) ?? [];
  const byRemount = immutable.every((c) => remounted.includes(c.option));
  return byRemount ? `${reason}; the ${x.caps.engine} engine remounts to change it` : reason;
}

/** Desired exports that exist: replaced, repaired or reopened in place. */
function exportChanges(x: Inputs, nodes: NodeChanges): ExportChanges {
  const out: ExportChanges = { replaced: new Map(), reopened: new Map(), repaired: [], adopted: [] };
  const underReopen = reopenedFiles(x, nodes);
  for (const [id, d] of x.wantExports) {
    const o = x.haveExports.get(id);
    if (!o) continue;
    const mutableOptions = x.caps.exportMutable(d.options.type);
    const { mutable, immutable } = compareExports(o.options, d.options, mutableOptions);
    const under = o.options['node-name'];
    const mountpoint = mountpointOf(o.options);
    const reopenedFile = mountpoint === undefined ? undefined : underReopen.get(mountpoint);
    if (immutable.length > 0) {
      out.replaced.set(id, {
        reason: exportReplaceReason(x, d.options.type, immutable),
        changes: [...immutable, ...mutable],
      });
    } else if (nodes.gone.has(under)) {
      out.replaced.set(id, { reason: `node ${under} replaced`, changes: [] });
    } else if (reopenedFile !== undefined) {
      out.replaced.set(id, {
        reason: `file node ${reopenedFile} under its mountpoint is reopened (the ${x.caps.engine} engine cannot while mounted)`,
        changes: mutable,
      });
    } else if (o.state === 'held') {
      const step: Step = {
        engine: x.caps.engine,
        action: 'adopt-export',
        export: d.options,
        origin: d.origin,
        changes: mutable,
      };
      if (o.reason !== undefined) step.reason = o.reason;
      out.adopted.push(step);
    } else if (o.state !== 'mounted') {
      const step: Step = {
        engine: x.caps.engine,
        action: 'repair-export',
        export: d.options,
        origin: d.origin,
        state: o.state,
        changes: mutable,
      };
      if (o.reason !== undefined) step.reason = o.reason;
      out.repaired.push(step);
    } else if (mutable.length > 0) {
      out.reopened.set(id, mutable);
    }
  }
  return out;
}

/** Steps and counts being collected, in the order the header comment gives. */
interface Collected {
  steps: Step[];
  summary: PlanSummary;
}

/** The steps in the order the header comment gives, with the summary. */
function orderSteps(x: Inputs, nodes: NodeChanges, exps: ExportChanges): Plan {
  const out: Collected = {
    steps: [],
    summary: { add: 0, reopen: 0, replace: 0, remove: 0, repair: 0, adopt: 0 },
  };
  removals(x, nodes, exps, out);
  const desiredBottomUp = new NodeGraph(x.desired.nodes.map((n) => n.options)).bottomUp();
  reopens(x, nodes, exps, desiredBottomUp, out);
  additions(x, nodes, exps, desiredBottomUp, out);
  out.steps.push(...exps.adopted);
  out.summary.adopt += exps.adopted.length;
  out.steps.push(...exps.repaired);
  out.summary.repair += exps.repaired.length;
  return out;
}

/** 1. exports removed or replaced, in observed order; 2. nodes closed, top-down in the observed graph. */
function removals(x: Inputs, nodes: NodeChanges, exps: ExportChanges, out: Collected): void {
  const engine = x.caps.engine;
  for (const o of x.observed.exports) {
    const id = o.options.id;
    const r = exps.replaced.get(id);
    if (!x.wantExports.has(id)) {
      out.steps.push({ engine, action: 'remove-export', export: o.options });
      out.summary.remove++;
    } else if (r) {
      out.steps.push({ engine, action: 'remove-export', export: o.options, replace: r });
      out.summary.replace++;
    }
  }
  const observedGraph = new NodeGraph(x.observed.nodes.map((n) => n.options));
  for (const name of observedGraph.bottomUp().reverse()) {
    if (!nodes.gone.has(name)) continue;
    const r = nodes.replaced.get(name);
    const node = x.have.get(name)!.options;
    out.steps.push(
      r ? { engine, action: 'remove-node', node, replace: r } : { engine, action: 'remove-node', node },
    );
    if (r) out.summary.replace++;
    else out.summary.remove++;
  }
}

/** 3.–5. exports losing rights, nodes to read-only top-down, nodes to writable bottom-up, other exports. */
function reopens(
  x: Inputs,
  nodes: NodeChanges,
  exps: ExportChanges,
  bottomUp: string[],
  out: Collected,
): void {
  const engine = x.caps.engine;
  const narrowing = (id: string) =>
    exps.reopened.get(id)!.some((c) => c.option === 'writable' && c.to === false);
  const reopenIds = x.desired.exports.map((e) => e.options.id).filter((id) => exps.reopened.has(id));
  const exportReopen = (id: string): Step => {
    const d = x.wantExports.get(id)!;
    return {
      engine,
      action: 'reopen-export',
      export: d.options,
      changes: exps.reopened.get(id)!,
      origin: d.origin,
    };
  };
  const nodeReopen = (name: string): Step => {
    const d = x.want.get(name)!;
    return {
      engine,
      action: 'reopen-node',
      node: d.options,
      changes: nodes.reopened.get(name)!,
      origin: d.origin,
    };
  };
  const reopened = (readOnly: boolean) => (name: string) =>
    nodes.reopened.has(name) && x.want.get(name)!.options['read-only'] === readOnly;
  out.steps.push(
    ...reopenIds.filter(narrowing).map(exportReopen),
    ...[...bottomUp].reverse().filter(reopened(true)).map(nodeReopen),
    ...bottomUp.filter(reopened(false)).map(nodeReopen),
    ...reopenIds.filter((id) => !narrowing(id)).map(exportReopen),
  );
  out.summary.reopen += nodes.reopened.size + exps.reopened.size;
}

/** 6. nodes added bottom-up (new and replaced); 7. exports added in declaration order. */
function additions(
  x: Inputs,
  nodes: NodeChanges,
  exps: ExportChanges,
  bottomUp: string[],
  out: Collected,
): void {
  const engine = x.caps.engine;
  for (const name of bottomUp) {
    const d = x.want.get(name)!;
    const r = nodes.replaced.get(name);
    if (r) out.steps.push({ engine, action: 'add-node', node: d.options, origin: d.origin, replace: r });
    else if (!x.have.has(name)) {
      out.steps.push({ engine, action: 'add-node', node: d.options, origin: d.origin });
      out.summary.add++;
    }
  }
  for (const d of x.desired.exports) {
    const id = d.options.id;
    const r = exps.replaced.get(id);
    if (r) out.steps.push({ engine, action: 'add-export', export: d.options, origin: d.origin, replace: r });
    else if (!x.haveExports.has(id)) {
      out.steps.push({ engine, action: 'add-export', export: d.options, origin: d.origin });
      out.summary.add++;
    }
  }
}
