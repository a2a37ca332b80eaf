/** Shows a plan: terraform-style lines for people, a stable JSON shape for programs. */
import { formatSize } from '../manifest/size.js';
import type { Change, ExportOptions, NodeOptions, Plan, Step } from './model.js';

function show(v: unknown): string {
  if (v === undefined) return '(unset)';
  if (typeof v === 'string') return v;
  return JSON.stringify(v);
}

function changeList(changes: readonly Change[]): string {
  return changes.map((c) => `${c.option}: ${show(c.from)} → ${show(c.to)}`).join(', ');
}

/** `prot0 (file) /srv/images/foo.qcow2 read-only`, `fmt0 (qcow2) file=prot0`. */
export function describeNode(n: NodeOptions): string {
  const unresolved = n.unresolved ?? [];
  const driver = unresolved.includes('driver') ? `format ${n.driver}, resolved when applied` : n.driver;
  const parts = [`${n['node-name']} (${driver})`];
  if (n.filename !== undefined) parts.push(n.filename);
  if (n.file !== undefined) parts.push(`file=${n.file}`);
  if (n.backing === null) parts.push('backing=none');
  else if (n.backing !== undefined) parts.push(`backing=${n.backing}`);
  if (n.number !== undefined) parts.push(`number=${n.number} (window read from the partition table)`);
  if (n.snapshot !== undefined) parts.push(`snapshot=${n.snapshot} (read-only view)`);
  if (n.offset !== undefined && n.offset !== 0) parts.push(`offset=${formatSize(n.offset)}`);
  if (n.size !== undefined) parts.push(`size=${formatSize(n.size)}`);
  if (n.locking !== undefined && n.locking !== 'auto') parts.push(`locking=${n.locking}`);
  if (n['force-share']) parts.push('force-share');
  if (n.cache?.direct) parts.push('cache.direct');
  if (n.cache?.['no-flush']) parts.push('cache.no-flush');
  if (n['read-only']) parts.push('read-only');
  return parts.join(' ');
}

/** Where an export is served: `/srv/images/foo.qcow2`, or `nbd name "web"`. */
export function exportTarget(e: ExportOptions): string {
  return e.type === 'fuse' ? e.mountpoint : `nbd name "${e.name}"`;
}

/** `exp0 (fuse) /srv/images/foo.qcow2 writable (node fmt0)`, `web (nbd) nbd name "web" read-only (node fmt0)`. */
export function describeExport(e: ExportOptions): string {
  const mode =
    e.overlay !== undefined ? `writable into an ${e.overlay} overlay (image read-only)` : undefined;
  const parts = [`${e.id} (${e.type}) ${exportTarget(e)}`, mode ?? (e.writable ? 'writable' : 'read-only')];
  if (e.type === 'fuse') {
    if (e.growable) parts.push('growable');
    if (e['allow-other'] !== 'auto') parts.push(`allow-other=${e['allow-other']}`);
    if (e['create-mountpoint']) parts.push('create-mountpoint');
  } else if (e.description !== undefined) parts.push(`description=${JSON.stringify(e.description)}`);
  let tail = `node ${e['node-name']}`;
  if (e.image !== undefined) {
    tail += `; shorthand: image ${e.image}, format ${e.format ?? 'auto'}`;
    if (e.partition !== undefined) tail += `, partition ${e.partition}`;
  }
  return `${parts.join(' ')} (${tail})`;
}

/** One line for a step, ending with the engine that carries it out; undefined for the add half of a replacement (shown once, at its removal). */
export function renderStep(step: Step): string | undefined {
  const line = stepLine(step);
  return line === undefined ? undefined : `${line} [${step.engine}]`;
}

function stepLine(step: Step): string | undefined {
  switch (step.action) {
    case 'remove-export':
      return step.replace
        ? `-/+ export ${step.export.id} (replace: ${step.replace.reason})`
        : `- export ${step.export.id}`;
    case 'remove-node':
      return step.replace
        ? `-/+ node ${step.node['node-name']} (replace: ${step.replace.reason})`
        : `- node ${step.node['node-name']}`;
    case 'reopen-export':
      return `~ export ${step.export.id} ${changeList(step.changes)} (reopen in place)`;
    case 'reopen-node':
      return `~ node ${step.node['node-name']} ${changeList(step.changes)} (reopen in place)`;
    case 'add-node':
      return step.replace ? undefined : `+ node ${describeNode(step.node)}`;
    case 'add-export':
      return step.replace ? undefined : `+ export ${describeExport(step.export)}`;
    case 'adopt-export': {
      const extra = step.changes.length > 0 ? `; ${changeList(step.changes)}` : '';
      return `> export ${step.export.id} ${exportTarget(step.export)} (adopt: ${step.reason ?? 'a kept connection'}${extra})`;
    }
    case 'repair-export': {
      const why =
        step.state === 'stale'
          ? 'stale mount'
          : step.export.type === 'nbd'
            ? 'not served'
            : 'missing from the mount table';
      const extra = step.changes.length > 0 ? `; ${changeList(step.changes)}` : '';
      return `! export ${step.export.id} ${exportTarget(step.export)} (repair: ${why}${step.reason ? `, ${step.reason}` : ''}${extra})`;
    }
  }
}

/** The plan as text: one line per change, then a summary line (or "No changes."). */
export function renderPlan(plan: Plan): string {
  const lines = plan.steps.map(renderStep).filter((l): l is string => l !== undefined);
  if (lines.length === 0) return 'No changes. The live state matches the manifests.\n';
  const s = plan.summary;
  const adopt = s.adopt > 0 ? `, ${s.adopt} to adopt` : '';
  const summary =
    `Plan: ${s.add} to add, ${s.reopen} to change in place, ${s.replace} to replace, ` +
    `${s.remove} to remove, ${s.repair} to repair${adopt}.`;
  return `${lines.join('\n')}\n\n${summary}\n`;
}

/** True when applying the plan would change anything. */
export function planHasChanges(plan: Plan): boolean {
  return plan.steps.length > 0;
}

/** The plan as plain JSON data: `{changes, summary, steps}`, each step `{action, node|export, ...}`. */
export function planToJson(plan: Plan): { changes: boolean; summary: Plan['summary']; steps: Step[] } {
  return JSON.parse(
    JSON.stringify({ changes: planHasChanges(plan), summary: plan.summary, steps: plan.steps }),
  );
}
