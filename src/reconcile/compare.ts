/**
 * Option-by-option comparison of nodes and exports, split by what the
 * engine's capabilities say a reopen can change in place.
 */
import type { Change, ExportOptions, NodeOptions } from './model.js';

/** Export options that only matter while mounting, so changing them alone changes nothing live. */
export const EXPORT_MOUNT_TIME_OPTIONS: readonly string[] = ['create-mountpoint'];

function same(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (a === null || b === null || typeof a !== 'object' || typeof b !== 'object') return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a).filter((k) => (a as Record<string, unknown>)[k] !== undefined);
  const kb = Object.keys(b).filter((k) => (b as Record<string, unknown>)[k] !== undefined);
  if (ka.length !== kb.length) return false;
  return ka.every((k) => same((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]));
}

function changesOf(from: object, to: object, ignore: readonly string[]): Change[] {
  const f = from as Record<string, unknown>;
  const t = to as Record<string, unknown>;
  const keys = [...new Set([...Object.keys(t), ...Object.keys(f)])].filter((k) => !ignore.includes(k));
  return keys.filter((k) => !same(f[k], t[k])).map((k) => ({ option: k, from: f[k], to: t[k] }));
}

/** Changes split into those a reopen applies in place (`mutable`) and those that force a replace. */
export interface Comparison {
  mutable: Change[];
  immutable: Change[];
}

function split(all: Change[], mutable: readonly string[]): Comparison {
  return {
    mutable: all.filter((c) => mutable.includes(c.option)),
    immutable: all.filter((c) => !mutable.includes(c.option)),
  };
}

/** Changes between an observed and a desired node; `mutable` lists the options its driver reopens in place. */
export function compareNodes(
  observed: NodeOptions,
  desired: NodeOptions,
  mutable: readonly string[],
): Comparison {
  return split(changesOf(observed, desired, []), mutable);
}

/** Changes between an observed and a desired export, split like compareNodes. */
export function compareExports(
  observed: ExportOptions,
  desired: ExportOptions,
  mutable: readonly string[],
): Comparison {
  return split(changesOf(observed, desired, EXPORT_MOUNT_TIME_OPTIONS), mutable);
}

/** "filename changed", "filename and offset changed". */
export function changedReason(changes: readonly Change[]): string {
  const names = changes.map((c) => c.option);
  if (names.length <= 1) return `${names[0] ?? 'options'} changed`;
  return `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]} changed`;
}
