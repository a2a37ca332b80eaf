/**
 * Where files that an image names (backing files, external data files) may
 * be opened from. Images are untrusted: a name is followed only inside the
 * allowed roots, after resolving `..` and symlinks, and never when it looks
 * like a protocol or `json:` specification.
 */
import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { BlkError } from '../errors.js';

export interface PathPolicy {
  /** Real paths of directories implicit files must lie in; 'any' disables the check (explicit opt-in only). */
  allowedRoots: readonly string[] | 'any';
}

/** A policy that allows implicit files only inside `roots` (resolved to real paths). */
export async function makePathPolicy(roots: readonly string[]): Promise<PathPolicy> {
  const real: string[] = [];
  for (const r of roots) {
    try {
      real.push(await realpath(resolve(r)));
    } catch {
      // A root that does not exist allows nothing.
    }
  }
  return { allowedRoots: real };
}

/** True when `p` (a real path) is `root` or lies below it. */
export function isInsideRoot(p: string, root: string): boolean {
  if (p === root) return true;
  const rel = relative(root, p);
  return rel !== '' && !rel.startsWith(`..${sep}`) && rel !== '..' && !isAbsolute(rel);
}

/**
 * Resolves a file name found inside an image (relative to the image's
 * directory) to a real path the policy allows; throws BACKING_POLICY otherwise.
 */
export async function resolveImplicitFile(
  policy: PathPolicy,
  imagePath: string,
  name: string,
  what: 'backing file' | 'data file' | 'extent file',
  field: string,
): Promise<string> {
  const refuse = (why: string) =>
    new BlkError('BACKING_POLICY', `${what} '${printable(name)}' refused: ${why}`, {
      file: imagePath,
      field,
    });
  if (name.length === 0) throw refuse('empty name');
  if (name.includes('\0')) throw refuse('the name contains a NUL byte');
  if (name.startsWith('json:')) throw refuse('json: specifications are never followed');
  // "proto:..." before any slash is a QEMU protocol prefix (nbd:, http:, file:, ...).
  const colon = name.indexOf(':');
  const slash = name.indexOf('/');
  if (colon > 0 && (slash < 0 || colon < slash)) throw refuse('protocol prefixes are not followed');
  const lexical = resolve(dirname(imagePath), name);
  let real: string;
  try {
    real = await realpath(lexical);
  } catch (e) {
    throw new BlkError(
      'BACKING_CHAIN',
      `cannot open ${what} '${printable(name)}': ${(e as Error).message}`,
      { file: imagePath, field },
      { cause: e },
    );
  }
  if (policy.allowedRoots !== 'any') {
    const roots = policy.allowedRoots;
    if (!roots.some((r) => isInsideRoot(real, r))) {
      throw refuse(`${real} is outside the allowed roots (${roots.join(', ') || 'none'})`);
    }
  }
  return real;
}

function printable(s: string): string {
  return s.replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** File-node options that make the opened fd itself prove it lies inside the policy's roots. */
export function confinement(policy: PathPolicy): { confineTo?: readonly string[] } {
  return policy.allowedRoots === 'any' ? {} : { confineTo: policy.allowedRoots };
}
