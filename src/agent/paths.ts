/**
 * The agent's path confinement: images, backing files and mountpoints must
 * lie inside an allowed root (--allow-root), resolved through symlinks.
 * Checked when a pass plans, and again by the block layer when it opens
 * implicit files (backing, data files) through the same roots.
 */
import { realpath } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { isInsideRoot } from '../block/path-policy.js';
import { fuseMountOn, recentMountTable } from '../export/mount-table.js';
import { NodeGraph } from '../manifest/graph.js';
import type { Desired } from '../reconcile/model.js';

/** Resolves a path through symlinks; for a file that does not exist yet, resolves its directory. */
async function resolveReal(path: string): Promise<string> {
  try {
    return await realpath(path);
  } catch {
    try {
      return join(await realpath(dirname(path)), basename(path));
    } catch {
      return path;
    }
  }
}

/** Why a canonical `path` (one the mount table names) is refused, or undefined inside one of `roots`. */
function outsideRootsAsIs(path: string, roots: readonly string[]): string | undefined {
  if (roots.some((r) => isInsideRoot(path, r))) return undefined;
  return `${path} is outside the allowed roots (${roots.join(', ') || 'none'})`;
}

/** Why `path` is refused, or undefined when it lies inside one of `roots` (real paths). */
export async function outsideRoots(
  path: string,
  roots: readonly string[] | 'any',
): Promise<string | undefined> {
  if (roots === 'any') return undefined;
  if (path.includes('\0')) return `path contains a NUL byte`;
  const real = await resolveReal(path);
  if (roots.some((r) => isInsideRoot(real, r))) return undefined;
  const via = real === path ? '' : ` (resolves to ${real})`;
  return `${path}${via} is outside the allowed roots (${roots.join(', ') || 'none'})`;
}

/** What confinement refuses: exports (with the reason to show) and the nodes whose image lies outside. */
export interface Refusals {
  exports: Map<string, string>;
  nodes: Set<string>;
}

/** The exports and nodes of `desired` whose paths leave the allowed roots; each distinct path resolved once. */
export async function refusedByRoots(desired: Desired, roots: readonly string[] | 'any'): Promise<Refusals> {
  const out: Refusals = { exports: new Map(), nodes: new Set() };
  if (roots === 'any') return out;
  const paths = new Set<string>();
  for (const n of desired.nodes) if (n.options.filename !== undefined) paths.add(n.options.filename);
  for (const e of desired.exports) if (e.options.type === 'fuse') paths.add(e.options.mountpoint);
  // A path a FUSE mount covers is never resolved here: realpath would ask the mount's server (for
  // our own mounts, this process: many at once fill libuv's pool with requests that wait on the
  // pool themselves). The mount table holds it canonical already, so the string is checked as is.
  if (paths.size === 0) return out;
  const table = await recentMountTable();
  const verdicts = new Map(
    await Promise.all(
      [...paths].map(
        async (p) =>
          [p, fuseMountOn(table, p) ? outsideRootsAsIs(p, roots) : await outsideRoots(p, roots)] as const,
      ),
    ),
  );
  const badNodes = new Map<string, string>();
  for (const n of desired.nodes) {
    const why = n.options.filename === undefined ? undefined : verdicts.get(n.options.filename);
    if (why) badNodes.set(n.options['node-name'], `image ${why}`);
  }
  const graph = new NodeGraph(desired.nodes.map((n) => n.options));
  for (const e of desired.exports) {
    const why = e.options.type === 'fuse' ? verdicts.get(e.options.mountpoint) : undefined;
    const bad = graph.below(e.options['node-name']).find((n) => badNodes.has(n));
    if (why) out.exports.set(e.options.id, `mountpoint ${why}`);
    else if (bad !== undefined) out.exports.set(e.options.id, badNodes.get(bad)!);
  }
  for (const n of badNodes.keys()) out.nodes.add(n);
  return out;
}
