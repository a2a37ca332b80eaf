import assert from 'node:assert/strict';
import { test } from 'node:test';
import { EMPTY_MANIFEST_STATE, resolveManifests } from '../../src/agent/manifest-state.js';
import { loadManifestText } from '../../src/manifest/load.js';

const doc = (name: string, id: string, extra = '') =>
  `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n${extra}  exports:\n    - id: ${id}\n      image: /srv/${id}.qcow2\n`;

test('a valid file is in force; an invalid edit keeps the last good version with the errors', () => {
  const v1 = loadManifestText('/m/a.yaml', doc('a', 'one'));
  const p1 = resolveManifests([v1], EMPTY_MANIFEST_STATE, 'h');
  assert.equal(p1.inForce.length, 1);
  assert.equal(p1.status[0]!.valid, true);

  const broken = loadManifestText('/m/a.yaml', `${doc('a', 'one')}  bogus: [\n`);
  assert.equal(broken.valid, false);
  const p2 = resolveManifests([broken], p1.next, 'h');
  assert.equal(p2.inForce.length, 1);
  assert.equal(p2.inForce[0]!.documents[0]!.exports[0]!.options.id, 'one');
  assert.equal(p2.status[0]!.valid, false);
  assert.equal(p2.status[0]!.lastGoodInForce, true);
  assert.ok(p2.status[0]!.errors.length > 0);
  assert.ok(p2.status[0]!.errors.every((e) => e.line !== null));

  // Fixed again: the new version replaces the old one.
  const v3 = loadManifestText('/m/a.yaml', doc('a', 'two'));
  const p3 = resolveManifests([v3], p2.next, 'h');
  assert.equal(p3.inForce[0]!.documents[0]!.exports[0]!.options.id, 'two');
  assert.equal(p3.status[0]!.valid, true);

  // Deleted: nothing in force any more.
  const p4 = resolveManifests([], p3.next, 'h');
  assert.equal(p4.inForce.length, 0);
  assert.equal(p4.next.lastGood.size, 0);
});

test('a file that was never valid has nothing in force', () => {
  const bad = loadManifestText('/m/b.yaml', 'apiVersion: nope\n');
  const p = resolveManifests([bad], EMPTY_MANIFEST_STATE, 'h');
  assert.equal(p.inForce.length, 0);
  assert.equal(p.status[0]!.lastGoodInForce, false);
});

test('on a collision the file in force first keeps running, even when it sorts later', () => {
  const z = loadManifestText('/m/z.yaml', doc('z', 'same'));
  const p1 = resolveManifests([z], EMPTY_MANIFEST_STATE, 'h');
  const a = loadManifestText('/m/a.yaml', doc('a', 'same'));
  const p2 = resolveManifests([a, z], p1.next, 'h');
  assert.deepEqual(
    p2.inForce.map((f) => f.file),
    ['/m/z.yaml'],
  );
  const sa = p2.status.find((s) => s.file === '/m/a.yaml')!;
  assert.equal(sa.valid, false);
  assert.match(sa.errors[0]!.message, /export id "same" is already used/);
});

test('an edit that collides falls back to the last good version of that file', () => {
  const a1 = loadManifestText('/m/a.yaml', doc('a', 'mine'));
  const b = loadManifestText('/m/b.yaml', doc('b', 'theirs'));
  const p1 = resolveManifests([a1, b], EMPTY_MANIFEST_STATE, 'h');
  assert.equal(p1.inForce.length, 2);
  const a2 = loadManifestText('/m/a.yaml', doc('a', 'theirs'));
  const p2 = resolveManifests([a2, b], p1.next, 'h');
  const ids = p2.inForce
    .flatMap((f) => f.documents.flatMap((d) => d.exports.map((e) => e.options.id)))
    .sort();
  assert.deepEqual(ids, ['mine', 'theirs']);
  const sa = p2.status.find((s) => s.file === '/m/a.yaml')!;
  assert.equal(sa.valid, false);
  assert.equal(sa.lastGoodInForce, true);
});

test('documents for other hosts are reported as ignored', () => {
  const f = loadManifestText('/m/h.yaml', doc('h', 'x', '  hosts: [elsewhere]\n'));
  const p = resolveManifests([f], EMPTY_MANIFEST_STATE, 'here');
  assert.deepEqual(p.status[0]!.ignoredForHost, ['h']);
});
