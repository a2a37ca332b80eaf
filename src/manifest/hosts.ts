/** `spec.hosts`: which hosts a manifest document applies to. */
import type { ManifestDocument } from './types.js';

/** True when the document applies to the host named `hostname` (no `hosts:` means every host). */
export function appliesToHost(doc: Pick<ManifestDocument, 'hosts'>, hostname: string): boolean {
  return doc.hosts === undefined || doc.hosts.includes(hostname);
}

/** True when some host could apply both documents (so their names must not collide). */
export function hostsOverlap(
  a: Pick<ManifestDocument, 'hosts'>,
  b: Pick<ManifestDocument, 'hosts'>,
): boolean {
  if (a.hosts === undefined || b.hosts === undefined) return true;
  return a.hosts.some((h) => b.hosts!.includes(h));
}
