/** Builders for desired and observed states in diff tests. */

import { nativeCapabilities } from '../../src/engine/native/capabilities.js';
import type { ExportOptions, FuseExportConfig, NodeOptions } from '../../src/manifest/types.js';
import { diff } from '../../src/reconcile/diff.js';
import type { Desired, EngineCapabilities, ExportState, Observed, Plan } from '../../src/reconcile/model.js';
import { deriveWritability } from '../../src/reconcile/writability.js';

/** The plan for the native engine (diff under the native engine's capabilities). */
export function plan(
  desired: Desired,
  observed: Observed,
  caps: EngineCapabilities = nativeCapabilities,
): Plan {
  return diff(desired, observed, caps);
}

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
  extra: Partial<FuseExportConfig> = {},
): FuseExportConfig {
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

/**
 * What an engine reports after applying these nodes and exports, every export
 * in `state`: as a plan opens them, nodes are read-only unless one of the
 * writable exports writes through them (asIs: the nodes exactly as given).
 */
export function observedOf(
  nodes: NodeOptions[],
  exports: ExportOptions[] = [],
  state: ExportState = 'mounted',
  opts: { asIs?: boolean } = {},
): Observed {
  const applied = opts.asIs
    ? nodes
    : deriveWritability(desiredOf(nodes, exports)).nodes.map((n) => n.options);
  return {
    nodes: applied.map((options) => ({ options: structuredClone(options) })),
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
