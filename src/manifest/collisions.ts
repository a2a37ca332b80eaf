/**
 * Names that must be unique across all manifests of a host: metadata.name,
 * node-names, export ids, mountpoints and NBD export names. Files are taken in order; a file that
 * collides with an earlier accepted one is refused as a whole, and the earlier
 * one stays valid.
 */
import { BlkError } from '../errors.js';
import { appliesToHost, hostsOverlap } from './hosts.js';
import type { ManifestDocument, ManifestFile, SourcePos } from './types.js';

type Kind = 'manifest name' | 'node-name' | 'export id' | 'mountpoint' | 'NBD export name';

interface Claim {
  kind: Kind;
  value: string;
  /** `kind|value`: what two claims collide on. */
  key: string;
  doc: ManifestDocument;
  source: SourcePos;
  generatedFor?: string;
}

/**
 * Each document's claims, made once: the agent checks every manifest of the
 * host on every pass, and unchanged documents are the same objects then.
 */
const claimsByDoc = new WeakMap<ManifestDocument, Claim[]>();

function claimsOf(doc: ManifestDocument): Claim[] {
  const known = claimsByDoc.get(doc);
  if (known) return known;
  const claim = (kind: Kind, value: string, source: SourcePos): Claim => ({
    kind,
    value,
    key: `${kind}|${value}`,
    doc,
    source,
  });
  // Exports first, so a shorthand whose id collides is reported once, not also for its generated nodes.
  const claims: Claim[] = [claim('manifest name', doc.name, doc.source)];
  for (const e of doc.exports) {
    claims.push(claim('export id', e.options.id, e.source));
    // One host-level NBD server: its export names are as unique as mountpoints.
    if (e.options.type === 'fuse') claims.push(claim('mountpoint', e.options.mountpoint, e.source));
    else claims.push(claim('NBD export name', e.options.name, e.source));
  }
  for (const n of doc.nodes) {
    const c = claim('node-name', n.options['node-name'], n.source);
    if (n.generatedFor !== undefined) c.generatedFor = n.generatedFor;
    claims.push(c);
  }
  claimsByDoc.set(doc, claims);
  return claims;
}

function where(s: SourcePos): string {
  return `${s.file}:${s.line}:${s.col}`;
}

/**
 * Checks collisions across `files` in the order given (a directory's sorted
 * order); with `hostname`, only documents for that host take part, otherwise
 * documents whose `hosts:` cannot overlap may reuse names. Returns new file
 * records; inputs are not changed.
 */
export function checkCollisions(
  files: readonly ManifestFile[],
  opts: { hostname?: string } = {},
): ManifestFile[] {
  const accepted = new Map<string, Claim[]>();
  return files.map((f) => {
    if (!f.valid) return f;
    // Claims of this file, by key: accepted only if the whole file is.
    const staged = new Map<string, Claim[]>();
    const problems: BlkError[] = [];
    for (const doc of f.documents) {
      if (opts.hostname !== undefined && !appliesToHost(doc, opts.hostname)) continue;
      problems.push(...documentCollisions(f.file, doc, accepted, staged));
    }
    if (problems.length > 0) {
      problems.sort(
        (a, b) => (a.place.line ?? 0) - (b.place.line ?? 0) || (a.place.col ?? 0) - (b.place.col ?? 0),
      );
      return { ...f, valid: false, problems: [...f.problems, ...problems] };
    }
    for (const [key, claims] of staged) {
      const before = accepted.get(key);
      if (before) before.push(...claims);
      else accepted.set(key, claims);
    }
    return f;
  });
}

/**
 * The collisions of one document's claims with accepted ones and those staged
 * from its file; stages the rest. Both are indexed by key, so a file of N
 * claims costs O(N), not O(N²).
 */
function documentCollisions(
  file: string,
  doc: ManifestDocument,
  accepted: ReadonlyMap<string, Claim[]>,
  staged: Map<string, Claim[]>,
): BlkError[] {
  const problems: BlkError[] = [];
  const collidingIds = new Set<string>();
  const overlaps = (c: Claim) => hostsOverlap(c.doc, doc);
  for (const claim of claimsOf(doc)) {
    // A shorthand export whose id collides already says so; its generated node-names would repeat it.
    if (
      collidingIds.size > 0 &&
      claim.generatedFor !== undefined &&
      collidingIds.has(claim.generatedFor.replace(/^shorthand export /, ''))
    )
      continue;
    const key = claim.key;
    const other = accepted.get(key)?.find(overlaps) ?? staged.get(key)?.find(overlaps);
    if (!other) {
      const list = staged.get(key);
      if (list) list.push(claim);
      else staged.set(key, [claim]);
      continue;
    }
    if (claim.kind === 'export id') collidingIds.add(claim.value);
    const sameFile = other.source.file === file;
    problems.push(
      new BlkError(
        'MANIFEST_COLLISION',
        `${claim.kind} "${claim.value}" is already used by manifest "${other.doc.name}" at ${where(other.source)}` +
          (sameFile ? '' : `; this manifest ("${doc.name}") is refused as a whole`),
        { file, line: claim.source.line, col: claim.source.col, path: claim.source.path },
      ),
    );
  }
  return problems;
}
