/**
 * The promise every manifest text must keep, for the fuzzer and its replay:
 * loading never throws, and every problem of an invalid text is a BlkError
 * located at FILE:LINE:COL inside it, found within a time bound.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isBlkError } from '../../src/errors.js';
import { loadManifestText } from '../../src/manifest/index.js';
import { REPO } from '../helpers/tools.js';

const PER_TEXT_MS = 1000;

/** Checks one text; returns a broken promise, if any. */
export function checkManifestText(name: string, text: string): string | undefined {
  const lineCount = text.split('\n').length;
  let r: ReturnType<typeof loadManifestText>;
  const t0 = performance.now();
  try {
    r = loadManifestText(name, text);
  } catch (e) {
    return `loadManifestText threw: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`;
  }
  const ms = performance.now() - t0;
  if (ms > PER_TEXT_MS) return `took ${Math.round(ms)} ms`;
  if (r.valid !== (r.problems.length === 0)) return 'valid disagrees with problems';
  for (const p of r.problems) {
    if (!isBlkError(p)) return `a problem is not a BlkError: ${String(p)}`;
    const { file, line, col } = p.place;
    if (file !== name || line === undefined || col === undefined)
      return `unlocated problem: ${p.code} ${p.format()}`;
    if (line < 1 || line > lineCount + 1 || col < 1)
      return `problem outside the text (${line}:${col}): ${p.format()}`;
    if (!p.format().startsWith(`${name}:${line}:${col}: `))
      return `format() is not FILE:LINE:COL: ${p.format()}`;
  }
  return undefined;
}

/** Saves a failing text as test/fixtures/fuzz/manifests/seed-<seed>.yaml (with what broke in a comment); returns the path. */
export function saveManifestFailure(text: string, seed: number, what: string): string {
  const dir = join(REPO, 'test/fixtures/fuzz/manifests');
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `seed-${seed}.yaml`);
  writeFileSync(path, `# fuzz failure: ${what.replace(/\n/g, ' ')}\n${text}`);
  return path;
}
