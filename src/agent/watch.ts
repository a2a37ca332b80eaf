/**
 * Watches the manifest directory. Events are only a hint: any change (an
 * editor's atomic save, a Kubernetes ConfigMap's `..data` symlink swap, a git
 * checkout) schedules one rescan of the whole directory after a short
 * debounce, and the rescan compares by content (docs/agent.md).
 */
import { watch } from 'chokidar';

export interface ManifestWatcher {
  close(): Promise<void>;
}

/** Calls `onChange` once per burst of filesystem events under `dir` (debounced by `debounceMs`). */
export function watchManifests(dir: string, onChange: () => void, debounceMs = 30): ManifestWatcher {
  let timer: NodeJS.Timeout | undefined;
  const kick = () => {
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => {
      timer = undefined;
      onChange();
    }, debounceMs);
  };
  const watcher = watch(dir, {
    ignoreInitial: true,
    followSymlinks: true,
    // Editors' swap and backup files still trigger a rescan; the rescan ignores them.
    depth: 4,
  });
  watcher.on('all', kick);
  watcher.on('error', kick);
  return {
    async close() {
      if (timer) clearTimeout(timer);
      await watcher.close();
    },
  };
}
