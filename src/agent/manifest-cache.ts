/**
 * Reads manifest files and parses only those whose text changed since the
 * last pass: a pass re-reads every file (level-triggered), and YAML parsing
 * and schema validation of unchanged files were most of a pass's time with
 * 200 exports. An unchanged file is handed back as the same object, which
 * the last-good bookkeeping recognizes cheaply.
 */
import { readFileSync } from 'node:fs';
import { loadManifestFile, loadManifestText } from '../manifest/load.js';
import type { ManifestFile } from '../manifest/types.js';

export class ManifestCache {
  private readonly byFile = new Map<string, { text: string; parsed: ManifestFile }>();

  /** The files' current content, parsed when it changed; forgets files not listed. */
  load(files: readonly string[]): ManifestFile[] {
    const seen = new Set(files);
    for (const f of [...this.byFile.keys()]) if (!seen.has(f)) this.byFile.delete(f);
    return files.map((file) => {
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
