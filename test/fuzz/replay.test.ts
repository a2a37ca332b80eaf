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
import { runQcow2Fuzz } from './qcow2-run.js';

const DIR = join(REPO, 'test/fixtures/fuzz');

test('manifest fixtures: loaded without a throw, every problem located', () => {
  const files = readdirSync(join(DIR, 'manifests')).filter((f) => f.endsWith('.yaml'));
  assert.ok(files.length > 0);
  for (const f of files) {
    const v = checkManifestText(f, readFileSync(join(DIR, 'manifests', f), 'utf8'));
    assert.equal(v, undefined, `${f}: ${v}`);
  }
});

test('qcow2 fixtures: refused or served with coded errors, no crash or hang', async (t) => {
  const names = readdirSync(DIR).filter((f) => f.endsWith('.qcow2.gz'));
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
      seed: number;
    };
    return { name: n, path, seed: meta.seed ?? i };
  });
  const s = await runQcow2Fuzz({
    corpusDir: dir,
    budgetMs: 120_000,
    seed: 0,
    workers: 1,
    perImageMs: 5000,
    maxRss: 1536 * 1024 * 1024,
    files,
    seeds: [],
  });
  assert.deepEqual(
    s.failures.map((f) => `${f.base}: ${f.reason}`),
    [],
  );
  assert.equal(s.images, files.length);
});
