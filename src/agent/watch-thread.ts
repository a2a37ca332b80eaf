/**
 * The chokidar watch of the manifest directory, run in a worker thread of the
 * agent (watch.ts starts one per watched directory identity). chokidar reads
 * the whole directory again on every event in it, an lstat per entry: with a
 * thousand manifests that held the agent's event loop for tens of
 * milliseconds per event, in the middle of the pass the event asked for.
 * Here it holds only this thread. The thread posts each event's path as it
 * comes: the inotify event itself (chokidar's raw event, which names the
 * file at once) and chokidar's own event after its re-read; watch.ts decides
 * what a burst of them asks for.
 */
import { basename, join, resolve } from 'node:path';
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { watch } from 'chokidar';

/** What the thread posts: a path an event named (undefined: it named none), an error, or that the watch is up. */
export type WatchMessage =
  | { kind: 'event'; path: string | undefined; raw: boolean }
  | { kind: 'error' }
  | { kind: 'ready' };

/**
 * The path a raw (inotify) event of chokidar names: `name` is relative to the
 * watched path, a directory or a file of it. Undefined when the event names
 * no file.
 */
export function rawEventPath(root: string, name: unknown, details: unknown): string | undefined {
  const watched = (details as { watchedPath?: unknown } | undefined)?.watchedPath;
  if (typeof watched !== 'string' || typeof name !== 'string' || name === '') return undefined;
  const w = resolve(watched);
  // A watch on a file reports the file's own name; one on a directory, the entry's.
  return w !== root && basename(w) === name ? w : join(w, name);
}

function run(dir: string): void {
  const port = parentPort!;
  const post = (m: WatchMessage) => port.postMessage(m);
  const root = resolve(dir);
  const w = watch(dir, {
    ignoreInitial: true,
    followSymlinks: true,
    // Editors' swap and backup files still trigger a rescan; the rescan ignores them.
    depth: 4,
  });
  w.on('all', (_event, path) => post({ kind: 'event', path, raw: false }));
  w.on('raw', (_event, name, details) =>
    post({ kind: 'event', path: rawEventPath(root, name, details), raw: true }),
  );
  w.on('error', () => post({ kind: 'error' }));
  w.on('ready', () => post({ kind: 'ready' }));
}

if (!isMainThread && (workerData as { manifestWatch?: string } | null)?.manifestWatch !== undefined)
  run((workerData as { manifestWatch: string }).manifestWatch);
