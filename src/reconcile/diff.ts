/**
 * The plan from observed to desired state (SPEC §2). Pure: no I/O, no clock,
 * inputs not mutated; the same inputs give the same plan.
 *
 * Order of steps, and why:
 *   1. remove-export   exports go before the nodes under them (flush, unmount)
 *   2. remove-node     top-down, so no node is closed under a parent
 *   3. reopen-export   that take rights away (writable → false), before nodes turn read-only
 *   4. reopen-node     to read-only top-down, then to writable bottom-up
 *   5. reopen-export   the others, once their nodes allow it
 *   6. add-node        bottom-up: children before parents
 *   7. add-export      on complete graphs
 *   8. repair-export   remount stale or vanished mounts, with the desired options
 * A replaced node is removed and added again, and so is everything above it
 * in the observed graph (parent nodes, exports on any of them).
 */
import { changedReason, compareExports, compareNodes } from './compare.js';
import type {
  Change,
  Desired,
  DesiredExport,
  DesiredNode,
  NodeOptions,
  Observed,
  ObservedExport,
  ObservedNode,
  Plan,
  PlanSummary,
  Replacement,
  Step,
} from './model.js';

function childrenOf(n: NodeOptions): { role: 'file' | 'backing'; name: string }[] {
  const out: { role: 'file' | 'backing'; name: string }[] = [];
  if (typeof n.file === 'string') out.push({ role: 'file', name: n.file });
  if (typeof n.backing === 'string') out.push({ role: 'backing', name: n.backing });
  return out;
}

/** Node-names in bottom-up order (children first), roots taken in `order`; cycles cannot hang it. */
function bottomUp(order: readonly string[], options: ReadonlyMap<string, NodeOptions>): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  const visit = (name: string): void => {
    if (seen.has(name)) return;
    seen.add(name);
    const n = options.get(name);
    if (!n) return;
    for (const c of childrenOf(n)) visit(c.name);
    out.push(name);
  };
  for (const name of order) visit(name);
  return out;
}

/** The plan that takes `observed` to `desired`. */
export function diff(desired: Desired, observed: Observed): Plan {
  const want = new Map<string, DesiredNode>(desired.nodes.map((n) => [n.options['node-name'], n]));
  const have = new Map<string, ObservedNode>(observed.nodes.map((n) => [n.options['node-name'], n]));
  const wantExports = new Map<string, DesiredExport>(desired.exports.map((e) => [e.options.id, e]));
  const haveExports = new Map<string, ObservedExport>(observed.exports.map((e) => [e.options.id, e]));

  // Nodes: replaced (own change or a child's), reopened, removed, added.
  const replaced = new Map<string, Replacement>();
  const reopened = new Map<string, Change[]>();
  for (const [name, d] of want) {
    const o = have.get(name);
    if (!o) continue;
    const { mutable, immutable } = compareNodes(o.options, d.options);
    if (immutable.length > 0) {
      replaced.set(name, { reason: changedReason(immutable), changes: [...immutable, ...mutable] });
    } else if (mutable.length > 0) reopened.set(name, mutable);
  }
  // Everything above a replaced node in the observed graph goes with it.
  const parents = new Map<string, { role: 'file' | 'backing'; name: string }[]>();
  for (const o of observed.nodes) {
    for (const c of childrenOf(o.options)) {
      parents.set(c.name, [...(parents.get(c.name) ?? []), { role: c.role, name: o.options['node-name'] }]);
    }
  }
  const queue = [...replaced.keys()];
  for (let child = queue.shift(); child !== undefined; child = queue.shift()) {
    for (const p of parents.get(child) ?? []) {
      if (!want.has(p.name) || replaced.has(p.name)) continue;
      replaced.set(p.name, { reason: `${p.role} ${child} replaced`, changes: [] });
      reopened.delete(p.name);
      queue.push(p.name);
    }
  }
  const removedNodes = observed.nodes.filter((o) => !want.has(o.options['node-name']));
  const goneNodes = new Set([...removedNodes.map((o) => o.options['node-name']), ...replaced.keys()]);

  // Exports.
  const steps: Step[] = [];
  const summary: PlanSummary = { add: 0, reopen: 0, replace: 0, remove: 0, repair: 0 };
  const replacedExports = new Map<string, Replacement>();
  const reopenedExports = new Map<string, Change[]>();
  const repaired: Step[] = [];
  for (const [id, d] of wantExports) {
    const o = haveExports.get(id);
    if (!o) continue;
    const { mutable, immutable } = compareExports(o.options, d.options);
    const under = o.options['node-name'];
    if (immutable.length > 0) {
      replacedExports.set(id, { reason: changedReason(immutable), changes: [...immutable, ...mutable] });
    } else if (goneNodes.has(under)) {
      replacedExports.set(id, { reason: `node ${under} replaced`, changes: [] });
    } else if (o.state !== 'mounted') {
      const step: Step = {
        action: 'repair-export',
        export: d.options,
        origin: d.origin,
        state: o.state,
        changes: mutable,
      };
      if (o.reason !== undefined) step.reason = o.reason;
      repaired.push(step);
    } else if (mutable.length > 0) {
      reopenedExports.set(id, mutable);
    }
  }

  // 1. remove exports (removed, then replaced), in observed order.
  for (const o of observed.exports) {
    const id = o.options.id;
    const r = replacedExports.get(id);
    if (!wantExports.has(id)) {
      steps.push({ action: 'remove-export', export: o.options });
      summary.remove++;
    } else if (r) {
      steps.push({ action: 'remove-export', export: o.options, replace: r });
      summary.replace++;
    }
  }

  // 2. remove nodes, top-down in the observed graph.
  const haveOptions = new Map([...have].map(([k, v]) => [k, v.options]));
  const observedBottomUp = bottomUp(
    observed.nodes.map((n) => n.options['node-name']),
    haveOptions,
  );
  for (const name of [...observedBottomUp].reverse()) {
    if (!goneNodes.has(name)) continue;
    const r = replaced.get(name);
    const node = have.get(name)!.options;
    if (r) {
      steps.push({ action: 'remove-node', node, replace: r });
      summary.replace++;
    } else {
      steps.push({ action: 'remove-node', node });
      summary.remove++;
    }
  }

  // 3.–5. reopen in place.
  const wantOptions = new Map([...want].map(([k, v]) => [k, v.options]));
  const desiredBottomUp = bottomUp(
    desired.nodes.map((n) => n.options['node-name']),
    wantOptions,
  );
  const narrowing = (changes: Change[]) => changes.some((c) => c.option === 'writable' && c.to === false);
  const exportReopen = (id: string): Step => {
    const d = wantExports.get(id)!;
    return {
      action: 'reopen-export',
      export: d.options,
      changes: reopenedExports.get(id)!,
      origin: d.origin,
    };
  };
  const reopenIds = desired.exports.map((e) => e.options.id).filter((id) => reopenedExports.has(id));
  for (const id of reopenIds) if (narrowing(reopenedExports.get(id)!)) steps.push(exportReopen(id));
  const nodeReopen = (name: string): Step => {
    const d = want.get(name)!;
    return { action: 'reopen-node', node: d.options, changes: reopened.get(name)!, origin: d.origin };
  };
  const toReadOnly = (name: string) => want.get(name)!.options['read-only'];
  for (const name of [...desiredBottomUp].reverse()) {
    if (reopened.has(name) && toReadOnly(name)) steps.push(nodeReopen(name));
  }
  for (const name of desiredBottomUp) {
    if (reopened.has(name) && !toReadOnly(name)) steps.push(nodeReopen(name));
  }
  for (const id of reopenIds) if (!narrowing(reopenedExports.get(id)!)) steps.push(exportReopen(id));
  summary.reopen += reopened.size + reopenedExports.size;

  // 6. add nodes bottom-up (new ones and replaced ones).
  for (const name of desiredBottomUp) {
    const d = want.get(name)!;
    const r = replaced.get(name);
    if (r) steps.push({ action: 'add-node', node: d.options, origin: d.origin, replace: r });
    else if (!have.has(name)) {
      steps.push({ action: 'add-node', node: d.options, origin: d.origin });
      summary.add++;
    }
  }

  // 7. add exports in declaration order.
  for (const d of desired.exports) {
    const id = d.options.id;
    const r = replacedExports.get(id);
    if (r) steps.push({ action: 'add-export', export: d.options, origin: d.origin, replace: r });
    else if (!haveExports.has(id)) {
      steps.push({ action: 'add-export', export: d.options, origin: d.origin });
      summary.add++;
    }
  }

  // 8. repair.
  steps.push(...repaired);
  summary.repair += repaired.length;
  return { steps, summary };
}
