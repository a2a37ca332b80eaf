/** The import-boundary check that npm test runs: it passes on src/ and fails on a violation. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

const SCRIPT = new URL('../../scripts/check-layers.mjs', import.meta.url).pathname;

function check(dir?: string) {
  return spawnSync(process.execPath, [SCRIPT, ...(dir ? [dir] : [])], { encoding: 'utf8' });
}

test('src/ keeps its layers', () => {
  const r = check();
  assert.equal(r.status, 0, r.stderr);
});

test('block importing the engine, and an impure reconcile, are refused', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'layers-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  for (const d of ['block', 'engine', 'reconcile']) mkdirSync(join(dir, d));
  writeFileSync(join(dir, 'engine', 'x.ts'), 'export const x = 1;\n');
  writeFileSync(join(dir, 'block', 'y.ts'), "import { x } from '../engine/x.js';\nexport const y = x;\n");
  writeFileSync(
    join(dir, 'reconcile', 'z.ts'),
    "import { readFileSync } from 'node:fs';\nexport const z = readFileSync;\n",
  );
  const r = check(dir);
  assert.equal(r.status, 1);
  assert.match(r.stderr, /block\/y\.ts: imports engine\/x\.js \(block\/ may not depend on engine\/\)/);
  assert.match(r.stderr, /reconcile\/z\.ts: imports node:fs, but reconcile\/ is pure/);
});
