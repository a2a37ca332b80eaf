/**
 * The manifest directory watch (src/agent/watch.ts, chokidar in its own
 * thread): real files, real inotify, a real worker thread. A burst names the
 * manifest files it touched, anything else directly in the directory adds
 * nothing, a change below it asks for everything; the watch is up when
 * `ready` settles, and close() ends its thread (else this file's process
 * would not exit).
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { type ManifestWatcher, watchManifests } from '../../src/agent/watch.js';
import { rawEventPath } from '../../src/agent/watch-thread.js';
import { tempDir } from '../helpers/tools.js';

/** A watch of `dir` whose bursts are collected; closed after the test. */
async function watching(
  t: Parameters<typeof tempDir>[0],
  dir: string,
): Promise<{ bursts: (string[] | undefined)[]; w: ManifestWatcher }> {
  const bursts: (string[] | undefined)[] = [];
  const w = watchManifests(dir, (files) => bursts.push(files?.sort()), { debounceMs: 50 });
  t.after(() => w.close());
  await w.ready;
  return { bursts, w };
}

async function until(what: string, ok: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('a saved manifest is named; swap files add nothing; a change below the directory asks for everything', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'old.yaml'), 'a: 1\n');
  const { bursts } = await watching(t, dir);

  writeFileSync(join(dir, 'x.yaml'), 'a: 1\n');
  writeFileSync(join(dir, '.x.yaml.swp'), 'swap');
  await until('a burst naming x.yaml', () => bursts.some((b) => b?.includes(join(dir, 'x.yaml'))));
  assert.ok(
    bursts.every((b) => b?.every((f) => f === join(dir, 'x.yaml'))),
    `only x.yaml named: ${JSON.stringify(bursts)}`,
  );

  bursts.length = 0;
  writeFileSync(join(dir, 'old.yaml'), 'a: 2\n');
  await until('a burst naming old.yaml', () => bursts.some((b) => b?.includes(join(dir, 'old.yaml'))));

  // A file below the directory (chokidar watches the subdirectory once it has seen it: write until then,
  // every 250 ms: writes closer together than the debounce would keep the burst from ever ending).
  mkdirSync(join(dir, 'sub'));
  bursts.length = 0;
  let wrote = 0;
  await until('a burst asking for everything', () => {
    if (Date.now() - wrote > 250) {
      writeFileSync(join(dir, 'sub', 'y.yaml'), `a: ${Date.now()}\n`);
      wrote = Date.now();
    }
    return bursts.includes(undefined);
  });
});

test('a raw inotify event names the entry of a watched directory, or the watched file itself', () => {
  assert.equal(rawEventPath('/m', 'x.yaml', { watchedPath: '/m' }), '/m/x.yaml');
  assert.equal(rawEventPath('/m', 'x.yaml', { watchedPath: '/m/x.yaml' }), '/m/x.yaml');
  assert.equal(rawEventPath('/m', 'y.yaml', { watchedPath: '/m/sub' }), '/m/sub/y.yaml');
  assert.equal(rawEventPath('/m', null, { watchedPath: '/m' }), undefined);
  assert.equal(rawEventPath('/m', 'x.yaml', undefined), undefined);
});
