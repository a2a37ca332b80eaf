/**
 * The agent's path confinement (SPEC §5): images, backing files and
 * mountpoints must lie inside an allowed root, resolved through symlinks.
 * Checked when a pass plans, and again by the block layer when it opens
 * implicit files (backing, data files) through the same roots.
 */
import { realpath } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { isInsideRoot } from '../block/path-policy.js';

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
