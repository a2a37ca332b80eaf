/**
 * Watches the manifest directory. Events are only a hint, and the pass they
 * ask for compares by content (docs/agent.md). A burst of events (after a
 * short debounce) names the manifest files it touched, so the pass can be
 * incremental; a burst that touched anything else than manifest files directly
 * in the directory (a Kubernetes ConfigMap's `..data` symlink swap, a
 * subdirectory, the directory itself, a watch error) asks for a full pass.
 * Other files (editors' swap and backup files) add nothing to a burst.
 */
import { basename, dirname, join, resolve } from 'node:path';
import { watch } from 'chokidar';
import { isManifestName } from '../manifest/directory.js';

export interface ManifestWatcher {
  close(): Promise<void>;
}

/**
 * Calls `onChange` once per burst of filesystem events under `dir` (debounced
 * by `debounceMs`) with the manifest files it touched (`join(dir, name)`), or
 * with undefined when everything must be looked at.
 */
export function watchManifests(
  dir: string,
  onChange: (files: string[] | undefined) => void,
  debounceMs = 30,
): ManifestWatcher {
  let timer: NodeJS.Timeout | undefined;
  let files: Set<string> | undefined = new Set();
  const root = resolve(dir);
  const note = (path: unknown) => {
    if (files === undefined) return;
    const p = typeof path === 'string' ? resolve(path) : undefined;
    const name = p === undefined ? undefined : basename(p);
    if (p === undefined || name === undefined || dirname(p) !== root || name.startsWith('..'))
      files = undefined;
    else if (isManifestName(name)) files.add(join(dir, name));
  };
  const kick = (path: unknown) => {
    note(path);
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => {
      timer = undefined;
      const burst = files;
      files = new Set();
      onChange(burst === undefined ? undefined : [...burst]);
    }, debounceMs);
  };
  const watcher = watch(dir, {
    ignoreInitial: true,
    followSymlinks: true,
    // Editors' swap and backup files still trigger a rescan; the rescan ignores them.
    depth: 4,
  });
  watcher.on('all', (_event, path) => kick(path));
  watcher.on('error', () => kick(undefined));
  return {
    async close() {
      if (timer) clearTimeout(timer);
      await watcher.close();
    },
  };
}
