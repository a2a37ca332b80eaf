/** Builds the desired state from loaded manifests, for the host and for each engine. */
import { appliesToHost } from '../manifest/hosts.js';
import type { EngineName, ManifestFile } from '../manifest/types.js';
import type { Desired } from './model.js';

/** Which documents count: the host's (all when absent), and one engine's (`engine`, with `fallback` for documents that name none). */
export interface DesiredFilter {
  hostname?: string;
  engine?: { name: EngineName; fallback: EngineName };
}

/**
 * The union of the valid manifest files (collisions already checked, e.g. by
 * loadManifestDir) that the filter selects; without one every document counts.
 */
export function desiredFromManifests(files: readonly ManifestFile[], filter: DesiredFilter = {}): Desired {
  const desired: Desired = { nodes: [], exports: [] };
  for (const f of files) {
    if (!f.valid) continue;
    for (const doc of f.documents) {
      if (filter.hostname !== undefined && !appliesToHost(doc, filter.hostname)) continue;
      if (filter.engine && (doc.engine ?? filter.engine.fallback) !== filter.engine.name) continue;
      for (const n of doc.nodes) {
        const origin = { ...n.source, manifest: doc.name };
        desired.nodes.push({
          options: n.options,
          origin: n.generatedFor === undefined ? origin : { ...origin, generatedFor: n.generatedFor },
        });
      }
      for (const e of doc.exports) {
        desired.exports.push({
          options: e.options,
          origin: { ...e.source, manifest: doc.name },
          shorthand: e.shorthand,
        });
      }
    }
  }
  return desired;
}
