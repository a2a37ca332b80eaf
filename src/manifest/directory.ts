/** Loads every manifest of a directory (or a list of paths) as one set, names unique across the set. */
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { BlkError } from '../errors.js';
import { checkCollisions } from './collisions.js';
import { loadManifestFile } from './load.js';
import type { ManifestFile } from './types.js';

/** True for names a manifest directory loads: `*.yaml` / `*.yml`, not hidden (ConfigMap `..data` and editor files). */
export function isManifestName(name: string): boolean {
  return !name.startsWith('.') && /\.ya?ml$/.test(name);
}

/**
 * The manifest files of `dir` (not recursive), sorted by name: the order
 * collisions are decided in. A regular file is known from the directory entry
 * itself; only symlinks (a ConfigMap's files) and entries of unknown type are
 * stat-ed: the agent lists the directory on every pass.
 */
export function listManifestFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true })
    .filter((d) => isManifestName(d.name))
    .filter((d) => {
      if (d.isFile()) return true;
      if (d.isDirectory()) return false;
      try {
        return statSync(join(dir, d.name)).isFile();
      } catch {
        return false;
      }
    })
    .map((d) => d.name)
    .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
    .map((name) => join(dir, name));
}

/** Loads files and directories (each directory's manifests in sorted order) as one set; never throws for a bad path. */
export function loadManifestPaths(
  paths: readonly string[],
  opts: { hostname?: string } = {},
): ManifestFile[] {
  const files: ManifestFile[] = [];
  for (const p of paths) {
    let isDir = false;
    try {
      isDir = statSync(p).isDirectory();
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code ?? 'error';
      files.push({
        file: p,
        valid: false,
        documents: [],
        problems: [new BlkError('MANIFEST_SYNTAX', `cannot read: ${code}`, { file: p })],
      });
      continue;
    }
    if (isDir) {
      for (const f of listManifestFiles(p)) files.push(loadManifestFile(f));
    } else {
      files.push(loadManifestFile(p));
    }
  }
  return checkCollisions(files, opts);
}

/** Loads the manifests of one directory, as the agent and `plan` see them. */
export function loadManifestDir(dir: string, opts: { hostname?: string } = {}): ManifestFile[] {
  return loadManifestPaths([dir], opts);
}
