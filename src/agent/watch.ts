/**
 * Watches the manifest directory. Events are only a hint, and the pass they
 * ask for compares by content (docs/agent.md). A burst of events (after a
 * short debounce) names the manifest files it touched, so the pass can be
 * incremental; a burst that touched anything else than manifest files directly
 * in the directory (a Kubernetes ConfigMap's `..data` symlink swap, a
 * subdirectory, the directory itself, a watch error) asks for a full pass.
 * Other files (editors' swap and backup files) add nothing to a burst. A
 * burst starts at the inotify event itself (chokidar's raw event, which names
 * the file), not after chokidar has read the whole directory again; chokidar
 * runs in a worker thread (watch-thread.ts), so its re-reads of a large
 * directory never hold up a pass.
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
import { basename, dirname, extname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { isManifestName } from '../manifest/directory.js';
import type { WatchMessage } from './watch-thread.js';

export interface ManifestWatcher {
  /** Settles once the first watch is up: changes from then on are seen. */
  readonly ready: Promise<void>;
  close(): Promise<void>;
}

/** One watch of the directory, in its own thread (watch-thread.ts). */
interface WatchThread {
  readonly ready: Promise<void>;
  close(): Promise<void>;
}

/**
 * Starts the watch thread on `dir`: its built module, or from the TypeScript
 * sources (tests, run through tsx) the same module after tsx's loader, which a
 * worker thread does not inherit.
 */
function startThread(dir: string): Worker {
  const ext = extname(fileURLToPath(import.meta.url));
  const thread = new URL(`./watch-thread${ext}`, import.meta.url);
  const workerData = { manifestWatch: dir };
  if (ext !== '.ts') return new Worker(thread, { workerData });
  const tsx = import.meta.resolve('tsx/esm/api');
  const boot = `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(thread.href)}); });`;
  return new Worker(boot, { eval: true, workerData });
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

/** A promise and the function that settles it. */
function settled(): { promise: Promise<void>; resolve: () => void } {
  let resolve: () => void = () => undefined;
  const promise = new Promise<void>((res) => {
    resolve = res;
  });
  return { promise, resolve };
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
  const start = (): WatchThread => {
    const worker = startThread(dir);
    const { promise: ready, resolve: up } = settled();
    let ending = false;
    worker.on('message', (m: WatchMessage) => {
      if (m.kind === 'ready') return up();
      if (m.kind === 'error') return kick(undefined);
      // An event about the directory itself (unlinkDir, a rename away): its watch may be dead from here on.
      if (!m.raw && m.path !== undefined && resolve(m.path) === root) lost = true;
      kick(m.path);
    });
    // A thread that died watches nothing: the identity check starts another.
    worker.on('error', () => {
      lost = true;
      kick(undefined);
    });
    worker.on('exit', () => {
      up();
      if (!closed && !ending) lost = true;
    });
    return {
      ready,
      close: async () => {
        ending = true;
        await worker.terminate();
      },
    };
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
      // A manifest saved before the new watch is up is found by the full pass asked for once it is.
      await watcher.ready;
      opts.log?.('manifest directory is back; watching it again', { dir });
      kick(undefined);
    } finally {
      swapping = false;
    }
  };
  const ticker = setInterval(() => void check(), opts.checkMs ?? 1000);
  ticker.unref();

  return {
    ready: watcher.ready,
    async close() {
      closed = true;
      clearInterval(ticker);
      if (timer) clearTimeout(timer);
      await watcher.close();
    },
  };
}
