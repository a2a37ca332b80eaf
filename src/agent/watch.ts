/**
 * Watches the manifest directory. Events are only a hint, and the pass they
 * ask for compares by content (docs/agent.md). A burst of events (after a
 * short debounce) names the manifest files it touched, so the pass can be
 * incremental; a burst that touched anything else than manifest files directly
 * in the directory (a Kubernetes ConfigMap's `..data` symlink swap, a
 * subdirectory, the directory itself, a watch error) asks for a full pass.
 * Other files (editors' swap and backup files) add nothing to a burst.
 *
 * The directory itself may go away and come back (a sync tool that replaces
 * it, a volume remounted, a bind mount swapped). An inotify watch follows the
 * old inode, so events stop even though the path is back. A cheap identity
 * check (stat: device and inode, once per `checkMs`) notices the loss and the
 * return, builds a new watch on whatever the path names now, and asks for a
 * full pass. While the directory is gone the state in force stays (the pass
 * it asks for is the agent's business: a missing directory changes nothing).
 */
import { statSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { type FSWatcher, watch } from 'chokidar';
import { isManifestName } from '../manifest/directory.js';

export interface ManifestWatcher {
  close(): Promise<void>;
}

export interface WatchOptions {
  /** Debounce of a burst of events, in ms (default 30). */
  debounceMs?: number;
  /** How often the directory's identity is checked, in ms (default 1000). */
  checkMs?: number;
  /** Told once when the directory goes away and once when it is watched again. */
  log?: (msg: string, fields: Record<string, unknown>) => void;
}

/** The directory's identity (device and inode, symlinks followed), or undefined when it is not a directory now. */
export function directoryIdentity(path: string): string | undefined {
  try {
    const st = statSync(path);
    return st.isDirectory() ? `${st.dev}:${st.ino}` : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Calls `onChange` once per burst of filesystem events under `dir` (debounced
 * by `debounceMs`) with the manifest files it touched (`join(dir, name)`), or
 * with undefined when everything must be looked at.
 */
export function watchManifests(
  dir: string,
  onChange: (files: string[] | undefined) => void,
  opts: WatchOptions = {},
): ManifestWatcher {
  const debounceMs = opts.debounceMs ?? 30;
  let timer: NodeJS.Timeout | undefined;
  let files: Set<string> | undefined = new Set();
  const root = resolve(dir);
  let closed = false;
  // What the current watch was built on, and whether the directory was seen gone (or touched as a whole) since.
  let watched = directoryIdentity(root);
  let lost = watched === undefined;
  let swapping = false;

  const note = (path: unknown) => {
    if (files === undefined) return;
    const p = typeof path === 'string' ? resolve(path) : undefined;
    const name = p === undefined ? undefined : basename(p);
    if (p === undefined || name === undefined || dirname(p) !== root || name.startsWith('..'))
      files = undefined;
    else if (isManifestName(name)) files.add(join(dir, name));
  };
  const kick = (path: unknown) => {
    if (closed) return;
    note(path);
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => {
      timer = undefined;
      const burst = files;
      files = new Set();
      onChange(burst === undefined ? undefined : [...burst]);
    }, debounceMs);
  };
  const start = (): FSWatcher => {
    const w = watch(dir, {
      ignoreInitial: true,
      followSymlinks: true,
      // Editors' swap and backup files still trigger a rescan; the rescan ignores them.
      depth: 4,
    });
    w.on('all', (_event, path) => {
      // An event about the directory itself (unlinkDir, a rename away): its watch may be dead from here on.
      if (typeof path === 'string' && resolve(path) === root) lost = true;
      kick(path);
    });
    w.on('error', () => kick(undefined));
    return w;
  };
  let watcher = start();

  const check = async () => {
    if (closed || swapping) return;
    const now = directoryIdentity(root);
    if (now === undefined) {
      if (!lost)
        opts.log?.('manifest directory is gone; the state in force stays, waiting for it to return', { dir });
      lost = true;
      return;
    }
    if (!lost && now === watched) return;
    swapping = true;
    try {
      const old = watcher;
      watcher = start();
      watched = now;
      lost = false;
      await old.close();
      opts.log?.('manifest directory is back; watching it again', { dir });
      kick(undefined);
    } finally {
      swapping = false;
    }
  };
  const ticker = setInterval(() => void check(), opts.checkMs ?? 1000);
  ticker.unref();

  return {
    async close() {
      closed = true;
      clearInterval(ticker);
      if (timer) clearTimeout(timer);
      await watcher.close();
    },
  };
}
