/**
 * The manifests a pass starts from. ManifestCache reads manifest files and
 * parses only those whose text changed since the
 * last pass: a pass re-reads every file (level-triggered), and YAML parsing
 * and schema validation of unchanged files were most of a pass's time with
 * 200 exports. An unchanged file is handed back as the same object, which
 * the last-good bookkeeping recognizes cheaply.
 */
import { readFileSync } from 'node:fs';
import { describeError } from '../errors.js';
import { listManifestFiles } from '../manifest/directory.js';
import { loadManifestFile, loadManifestText } from '../manifest/load.js';
import type { ManifestFile } from '../manifest/types.js';
import type { Logger } from './log.js';
import {
  EMPTY_MANIFEST_STATE,
  type ManifestState,
  type ManifestStatus,
  resolveManifests,
} from './manifest-state.js';

export class ManifestCache {
  private readonly byFile = new Map<string, { text: string; parsed: ManifestFile }>();

  /**
   * The files' current content, parsed when it changed; forgets files not
   * listed. With `only` (an incremental pass), a file read before and not in
   * `only` is not read again: its last version is handed back.
   */
  load(files: readonly string[], only?: ReadonlySet<string>): ManifestFile[] {
    const seen = new Set(files);
    for (const f of [...this.byFile.keys()]) if (!seen.has(f)) this.byFile.delete(f);
    return files.map((file) => {
      const known = only && !only.has(file) ? this.byFile.get(file) : undefined;
      if (known) return known.parsed;
      let text: string;
      try {
        text = readFileSync(file, 'utf8');
      } catch {
        this.byFile.delete(file);
        return loadManifestFile(file); // reports the read error with the file's name
      }
      const hit = this.byFile.get(file);
      if (hit && hit.text === text) return hit.parsed;
      const parsed = loadManifestText(file, text);
      this.byFile.set(file, { text, parsed });
      return parsed;
    });
  }
}

/**
 * The manifests in force across passes: reads the directory each pass (only
 * changed files parsed), keeps the last good version of invalid files, logs
 * new errors once, and reports which files' content in force changed.
 */
export class ManifestsInForce {
  private readonly cache = new ManifestCache();
  private state: ManifestState = EMPTY_MANIFEST_STATE;
  private previous = new Map<string, ManifestFile>();
  /** The files as read by the last load, and what it found in force. */
  private lastFresh: readonly ManifestFile[] = [];
  private lastInForce: ManifestFile[] = [];
  /** Each file's status after the last load (for GET /status). */
  status: ManifestStatus[] = [];

  constructor(
    private readonly dir: string,
    private readonly hostname: string,
    private readonly log: Logger,
  ) {}

  /**
   * The files in force now (a directory that cannot be read keeps the previous
   * state), the ids of exports whose file's content in force changed, and the
   * versions before and after of every file whose content in force changed
   * (came, went or was edited). With `only`, only those files are read again
   * (the directory is still listed); collisions are still checked host-wide.
   */
  load(only?: ReadonlySet<string>): {
    inForce: ManifestFile[];
    changedExports: string[];
    changedVersions: ManifestFile[];
  } {
    let fresh: ManifestFile[] | undefined;
    try {
      fresh = this.cache.load(listManifestFiles(this.dir), only);
    } catch (e) {
      this.log.error('cannot read the manifest directory; keeping the state in force', {
        dir: this.dir,
        error: describeError(e),
      });
    }
    // The same files, each the same object (read and found unchanged): nothing can have changed.
    // An event that named a file whose content is as before costs its reads, not a host-wide check.
    if (fresh && fresh.length === this.lastFresh.length && fresh.every((f, i) => f === this.lastFresh[i]))
      return { inForce: this.lastInForce, changedExports: [], changedVersions: [] };
    if (fresh) {
      this.lastFresh = fresh;
      const mp = resolveManifests(fresh, this.state, this.hostname);
      this.state = mp.next;
      for (const s of mp.status) this.logNewErrors(s);
      this.status = mp.status;
    }
    const inForce = [...this.state.lastGood.values()];
    const changed = inForce.filter((f) => this.previous.get(f.file) !== f);
    const changedExports = changed.flatMap((f) =>
      f.documents.flatMap((d) => d.exports.map((e) => e.options.id)),
    );
    const now = new Map(inForce.map((f) => [f.file, f]));
    const changedVersions = [...changed];
    for (const [file, before] of this.previous) if (now.get(file) !== before) changedVersions.push(before);
    this.previous = now;
    this.lastInForce = inForce;
    return { inForce, changedExports, changedVersions };
  }

  private logNewErrors(s: ManifestStatus): void {
    if (s.valid) return; // before the look-up: it is linear, and this runs for every file
    const before = this.status.find((x) => x.file === s.file);
    if (JSON.stringify(before?.errors) === JSON.stringify(s.errors)) return;
    for (const e of s.errors) {
      this.log.error(`${e.file}${e.line !== null ? `:${e.line}:${e.col}` : ''}: ${e.message}`, {
        manifest: s.file,
        lastGoodInForce: s.lastGoodInForce,
      });
    }
  }
}
