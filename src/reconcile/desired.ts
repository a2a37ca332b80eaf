/** Builds the desired state from loaded manifests. */
import { appliesToHost } from '../manifest/hosts.js';
import type { ManifestFile } from '../manifest/types.js';
import type { Desired } from './model.js';

/**
 * The union of the valid manifest files (collisions already checked, e.g. by
 * loadManifestDir) for `hostname`; without it every document counts.
 */
export function desiredFromManifests(files: readonly ManifestFile[], hostname?: string): Desired {
  const desired: Desired = { nodes: [], exports: [] };
  for (const f of files) {
    if (!f.valid) continue;
    for (const doc of f.documents) {
      if (hostname !== undefined && !appliesToHost(doc, hostname)) continue;
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
