/**
 * Which manifest content is in force: a file that parses and validates
 * replaces its previous version; one that does not keeps its last good
 * version in force and reports its errors; a deleted file drops out.
 * Pure: the caller loads files and keeps the returned state for the next pass.
 */

import { checkCollisions } from '../manifest/collisions.js';
import { appliesToHost } from '../manifest/hosts.js';
import type { ManifestFile } from '../manifest/types.js';

export interface ManifestStatus {
  file: string;
  /** metadata.name of each document (of the version in force, when the file is invalid). */
  name: string;
  valid: boolean;
  errors: { file: string; line: number | null; col: number | null; message: string }[];
  /** For an invalid file: whether an earlier good version is still in force. */
  lastGoodInForce?: boolean;
  /** Documents of the version in force that name other hosts and are ignored here. */
  ignoredForHost?: string[];
}

export interface ManifestState {
  /** The last good version of each file (after collision checks). */
  lastGood: ReadonlyMap<string, ManifestFile>;
}

export const EMPTY_MANIFEST_STATE: ManifestState = { lastGood: new Map() };

export interface ManifestPass {
  /** The files whose content is desired state now (valid, collisions checked). */
  inForce: ManifestFile[];
  status: ManifestStatus[];
  next: ManifestState;
}

function names(f: ManifestFile): string {
  return f.documents.map((d) => d.name).join(', ');
}

/**
 * Decides what is in force from freshly loaded files (each loaded alone, in
 * the directory's order) and the previous state. Files in force before are
 * checked for collisions first (unchanged before edited), so the one that was
 * there first keeps running.
 */
export function resolveManifests(
  fresh: readonly ManifestFile[],
  prev: ManifestState,
  hostname: string,
): ManifestPass {
  const candidates: ManifestFile[] = [];
  for (const f of fresh) {
    if (f.valid) candidates.push(f);
    else {
      const old = prev.lastGood.get(f.file);
      if (old) candidates.push(old);
    }
  }
  // Unchanged files in force go first, then edited ones, then new ones: an edit
  // or a new file that collides is the one refused.
  const order = (f: ManifestFile) => {
    const old = prev.lastGood.get(f.file);
    if (!old) return 2;
    if (old === f || old.documents === f.documents) return 0; // the loader's cache hands back unchanged files as-is
    return JSON.stringify(old.documents) === JSON.stringify(f.documents) ? 0 : 1;
  };
  const firstCheck = checkCollisions(
    [...candidates].sort((a, b) => order(a) - order(b)),
    { hostname },
  );
  // A fresh version refused for a collision falls back to its last good version, if any.
  const retry = firstCheck.map((c) =>
    !c.valid && prev.lastGood.has(c.file) ? prev.lastGood.get(c.file)! : c,
  );
  const finalCheck = retry.some((r, i) => r !== firstCheck[i])
    ? checkCollisions(retry, { hostname })
    : firstCheck;
  const firstByFile = new Map(firstCheck.map((c) => [c.file, c]));
  const finalByFile = new Map(finalCheck.map((c) => [c.file, c]));

  const lastGood = new Map<string, ManifestFile>();
  const inForce: ManifestFile[] = [];
  const status: ManifestStatus[] = [];
  for (const f of fresh) {
    const final = finalByFile.get(f.file);
    if (final?.valid) {
      lastGood.set(f.file, final);
      inForce.push(final);
    }
    // Errors of the fresh version: its own (syntax, schema, semantics), or its collisions.
    const problems = !f.valid ? f.problems : (firstByFile.get(f.file)?.problems ?? []);
    const freshInForce = f.valid && final?.valid === true && final.documents === f.documents;
    const shown = final?.valid ? final : f;
    const s: ManifestStatus = {
      file: f.file,
      name: names(shown),
      valid: freshInForce,
      errors: freshInForce
        ? []
        : problems.map((p) => ({
            file: p.place.file ?? f.file,
            line: p.place.line ?? null,
            col: p.place.col ?? null,
            message: p.message + (p.place.path ? ` (at ${p.place.path})` : ''),
          })),
    };
    if (!freshInForce) s.lastGoodInForce = Boolean(final?.valid);
    const ignored = shown.documents.filter((d) => !appliesToHost(d, hostname)).map((d) => d.name);
    if (ignored.length) s.ignoredForHost = ignored;
    status.push(s);
  }
  return { inForce, status, next: { lastGood } };
}
