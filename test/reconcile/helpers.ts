/** Builders for desired and observed states in diff tests. */
import type { ExportOptions, NodeOptions } from '../../src/manifest/types.js';
import type { Desired, ExportState, Observed } from '../../src/reconcile/model.js';

/** A file node. */
export function fileNode(name: string, filename: string, extra: Partial<NodeOptions> = {}): NodeOptions {
  return { 'node-name': name, driver: 'file', 'read-only': false, filename, locking: 'auto', ...extra };
}

/** A format node over `file`. */
export function formatNode(
  name: string,
  driver: NodeOptions['driver'],
  file: string,
  extra: Partial<NodeOptions> = {},
): NodeOptions {
  return { 'node-name': name, driver, 'read-only': false, file, ...extra };
}

/** A fuse export. */
export function fuseExport(
  id: string,
  node: string,
  mountpoint: string,
  extra: Partial<ExportOptions> = {},
): ExportOptions {
  return {
    type: 'fuse',
    id,
    'node-name': node,
    mountpoint,
    'create-mountpoint': false,
    writable: false,
    growable: false,
    'allow-other': 'auto',
    ...extra,
  };
}

/** Desired state with dummy origins (line = declaration index). */
export function desiredOf(nodes: NodeOptions[], exports: ExportOptions[] = []): Desired {
  const origin = (i: number, kind: string) => ({
    file: 'm.yaml',
    line: i + 1,
    col: 7,
    path: `/spec/${kind}/${i}`,
    manifest: 'm',
  });
  return {
    nodes: nodes.map((options, i) => ({ options, origin: origin(i, 'blockdevs') })),
    exports: exports.map((options, i) => ({ options, origin: origin(i, 'exports'), shorthand: false })),
  };
}

/** What an engine reports after applying `desired`, every export in `state`. */
export function observedOf(
  nodes: NodeOptions[],
  exports: ExportOptions[] = [],
  state: ExportState = 'mounted',
): Observed {
  return {
    nodes: nodes.map((options) => ({ options: structuredClone(options) })),
    exports: exports.map((options) => ({ options: structuredClone(options), state })),
  };
}

/** Deep-freezes a value so a test fails if anything mutates it. */
export function deepFreeze<T>(v: T): T {
  if (v && typeof v === 'object') {
    for (const x of Object.values(v)) deepFreeze(x);
    Object.freeze(v);
  }
  return v;
}
