/**
 * Every invalid fixture states its problems in `# expect: LINE:COL fragment`
 * lines; the loader must report exactly those, at exactly those positions.
 * Subdirectories are loaded as one set (collisions across files).
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadManifestDir, loadManifestFile } from '../../src/manifest/index.js';
import type { ManifestFile } from '../../src/manifest/types.js';
import { REPO } from '../helpers/tools.js';

const FIXTURES = join(REPO, 'test', 'fixtures', 'manifests');
const INVALID = join(FIXTURES, 'invalid');
const VALID = join(FIXTURES, 'valid');

interface Expectation {
  line: number;
  col: number;
  fragment: string;
}

function expectationsOf(file: string): Expectation[] {
  const out: Expectation[] = [];
  for (const m of readFileSync(file, 'utf8').matchAll(/^# expect: (\d+):(\d+) (.+)$/gm)) {
    out.push({ line: Number(m[1]), col: Number(m[2]), fragment: m[3]! });
  }
  return out;
}

function assertProblems(loaded: ManifestFile, expected: Expectation[]): void {
  const got = loaded.problems.map((p) => p.format());
  assert.equal(
    loaded.valid,
    expected.length === 0,
    `${loaded.file}: valid=${loaded.valid}; problems: ${got.join(' | ')}`,
  );
  assert.equal(loaded.problems.length, expected.length, `${loaded.file}: ${got.join(' | ')}`);
  expected.forEach((exp, i) => {
    const p = loaded.problems[i]!;
    assert.equal(`${p.place.line}:${p.place.col}`, `${exp.line}:${exp.col}`, `${loaded.file}: ${p.format()}`);
    assert.ok(p.message.includes(exp.fragment), `${loaded.file}: "${p.message}" lacks "${exp.fragment}"`);
    // Every problem prints as FILE:LINE:COL: message, never as a stack trace.
    assert.match(
      p.format(),
      new RegExp(`^${loaded.file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:\\d+:\\d+: `),
    );
    assert.doesNotMatch(p.format(), /\n| {4}at /);
  });
}

const invalidFiles = readdirSync(INVALID)
  .filter((n) => n.endsWith('.yaml'))
  .sort();

test('there are at least 30 invalid fixtures, each stating its expected problems', () => {
  assert.ok(invalidFiles.length >= 30, `only ${invalidFiles.length}`);
  for (const name of invalidFiles) {
    assert.ok(expectationsOf(join(INVALID, name)).length > 0, `${name} has no # expect: line`);
  }
});

for (const name of invalidFiles) {
  test(`invalid fixture ${name}`, () => {
    const file = join(INVALID, name);
    assertProblems(loadManifestFile(file), expectationsOf(file));
  });
}

for (const name of readdirSync(INVALID).filter((n) => statSync(join(INVALID, n)).isDirectory())) {
  test(`invalid fixture set ${name}/ (loaded as one directory)`, () => {
    const files = loadManifestDir(join(INVALID, name));
    assert.ok(files.length >= 2);
    assert.ok(
      files.some((f) => f.valid),
      'the manifest that sorts first stays valid',
    );
    for (const f of files) assertProblems(f, expectationsOf(f.file));
  });
}

test('valid fixtures and manifests/examples load without problems', () => {
  const dirs = [VALID, join(REPO, 'manifests', 'examples')];
  for (const n of readdirSync(VALID)) if (statSync(join(VALID, n)).isDirectory()) dirs.push(join(VALID, n));
  let count = 0;
  for (const dir of dirs) {
    for (const f of loadManifestDir(dir)) {
      count++;
      assert.deepEqual(
        f.problems.map((p) => p.format()),
        [],
      );
      assert.ok(f.valid && f.documents.length > 0, f.file);
    }
  }
  assert.ok(count >= 4, `only ${count} valid manifests found`);
});
