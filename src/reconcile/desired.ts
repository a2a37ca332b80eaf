/** Builds the desired state from loaded manifests, for the host and for each engine. */
import { appliesToHost } from '../manifest/hosts.js';
import type { EngineName, ManifestDocument, ManifestFile } from '../manifest/types.js';
import type { Desired } from './model.js';

/** Which documents count: the host's (all when absent), and one engine's (`engine`, with `fallback` for documents that name none). */
export interface DesiredFilter {
  hostname?: string;
  engine?: { name: EngineName; fallback: EngineName };
}

/**
 * Each document's own part of the desired state, made once: the agent builds
 * the union on every pass, and unchanged manifests are the same objects from
 * pass to pass (its loader hands them back as they were). Entries are shared,
 * never changed.
 */
const partOf = new WeakMap<ManifestDocument, Desired>();

function documentPart(doc: ManifestDocument): Desired {
  const known = partOf.get(doc);
  if (known) return known;
  const part: Desired = { nodes: [], exports: [] };
  for (const n of doc.nodes) {
    const origin = { ...n.source, manifest: doc.name };
    part.nodes.push({
      options: n.options,
      origin: n.generatedFor === undefined ? origin : { ...origin, generatedFor: n.generatedFor },
    });
  }
  for (const e of doc.exports) {
    part.exports.push({
      options: e.options,
      origin: { ...e.source, manifest: doc.name },
      shorthand: e.shorthand,
    });
  }
  partOf.set(doc, part);
  return part;
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
      const part = documentPart(doc);
      for (const n of part.nodes) desired.nodes.push(n);
      for (const e of part.exports) desired.exports.push(e);
    }
  }
  return desired;
}
