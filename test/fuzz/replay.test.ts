/**
 * Every input that ever failed a fuzzer, replayed: qcow2 images
 * (test/fixtures/fuzz/*.qcow2.gz, opened next to a fresh seed corpus so their
 * relative backing and data file names resolve as when found) and manifests
 * (test/fixtures/fuzz/manifests/*.yaml).
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { gunzipSync } from 'node:zlib';
import { needTools, REPO, tempDir } from '../helpers/tools.js';
import { checkManifestText } from './manifest-check.js';
import { buildSeedCorpus } from './qcow2-corpus.js';
import { runQcow2Fuzz, saveFailures } from './qcow2-run.js';

const DIR = join(REPO, 'test/fixtures/fuzz');

test('manifest fixtures: loaded without a throw, every problem located', () => {
  const files = readdirSync(join(DIR, 'manifests')).filter((f) => f.endsWith('.yaml'));
  assert.ok(files.length > 0);
  for (const f of files) {
    const v = checkManifestText(f, readFileSync(join(DIR, 'manifests', f), 'utf8'));
    assert.equal(v, undefined, `${f}: ${v}`);
  }
});

/** The fixtures whose JSON says `todo` (a known, not yet fixed failure) or not. */
function qcow2Fixtures(todo: boolean): string[] {
  return readdirSync(DIR)
    .filter((f) => f.endsWith('.qcow2.gz'))
    .filter((f) => {
      const meta = JSON.parse(readFileSync(join(DIR, f.replace(/\.qcow2\.gz$/, '.json')), 'utf8')) as {
        todo?: string;
      };
      return (meta.todo !== undefined) === todo;
    });
}

for (const todo of [false, true]) {
  // Known failures get a todo test only while there are some (none are known today).
  if (todo && qcow2Fixtures(true).length === 0) continue;
  const title = todo
    ? 'qcow2 fixtures of known, not yet fixed failures (todo until fixed; then drop "todo" from the JSON)'
    : 'qcow2 fixtures: refused or served with coded errors, no crash or hang';
  test(title, { todo }, (t) => replayQcow2(t, qcow2Fixtures(todo)));
}

async function replayQcow2(t: import('node:test').TestContext, names: string[]): Promise<void> {
  if (names.length === 0) {
    t.diagnostic('no qcow2 fixture yet: the fuzzer has not found a failing image');
    return;
  }
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t, 'blkexport-replay-');
  buildSeedCorpus(dir);
  const files = names.map((n, i) => {
    const path = join(dir, `replay-${n.replace(/\.gz$/, '')}`);
    writeFileSync(path, gunzipSync(readFileSync(join(DIR, n))));
    const meta = JSON.parse(readFileSync(join(DIR, n.replace(/\.qcow2\.gz$/, '.json')), 'utf8')) as {
      seed?: number;
      writes?: boolean;
    };
    return { name: n, path, seed: meta.seed ?? i, writes: meta.writes === true };
  });
  // Inputs found with writes are replayed read-write (on copies, so the read-only ones stay as found).
  for (const writes of [false, true]) {
    const these = files.filter((f) => f.writes === writes);
    if (these.length === 0) continue;
    const s = await runQcow2Fuzz({
      corpusDir: dir,
      budgetMs: 120_000,
      seed: 0,
      workers: 1,
      perImageMs: 5000,
      maxRss: 1536 * 1024 * 1024,
      files: these,
      seeds: [],
      writes,
    });
    assert.deepEqual(
      s.failures.map((f) => `${f.base}: ${f.reason}`),
      [],
    );
    assert.equal(s.images, these.length);
  }
}

test('the fuzzer pins a hang on its input, kills the worker, goes on, and saves the input for replay', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t, 'blkexport-fuzz-machinery-');
  // A 1 ms bound makes every check "hang" when the watchdog looks.
  const s = await runQcow2Fuzz({
    corpusDir: dir,
    budgetMs: 3000,
    seed: 7,
    workers: 1,
    perImageMs: 1,
    maxRss: 2 ** 40,
  });
  assert.ok(s.failures.length > 0, 'no hang was pinned');
  assert.ok(
    s.failures.every((f) => /no answer within 1 ms/.test(f.reason) && f.image.length > 0),
    `failures other than pinned hangs: ${JSON.stringify(s.failures.map((f) => f.reason).filter((r) => !/no answer within 1 ms/.test(r)))}`,
  );
  const out = join(dir, 'saved');
  const names = saveFailures(out, s.failures.slice(0, 3));
  const files = names.map((n) => {
    const path = join(dir, `${n}.qcow2`);
    writeFileSync(path, gunzipSync(readFileSync(join(out, `${n}.qcow2.gz`))));
    const meta = JSON.parse(readFileSync(join(out, `${n}.json`), 'utf8')) as {
      seed: number;
      steps: string[];
    };
    assert.ok(Array.isArray(meta.steps));
    return { name: n, path, seed: meta.seed };
  });
  const r = await runQcow2Fuzz({
    corpusDir: dir,
    budgetMs: 60_000,
    seed: 0,
    workers: 1,
    perImageMs: 5000,
    maxRss: 2 ** 40,
    files,
    seeds: [],
  });
  assert.deepEqual(r.failures, []);
  assert.equal(r.images, files.length);
});
