import assert from 'node:assert/strict';
import { test } from 'node:test';
import { scopeOfChange } from '../../src/agent/pass-scope.js';
import { loadManifestText } from '../../src/manifest/load.js';
import { desiredFromManifests } from '../../src/reconcile/desired.js';

const doc = (name: string, id: string, image: string, mountpoint: string) =>
  `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n  exports:\n    - id: ${id}\n      image: ${image}\n      mountpoint: ${mountpoint}\n`;

const files = {
  a: loadManifestText('/m/a.yaml', doc('a', 'a', '/srv/a.qcow2', '/srv/a.raw')),
  // b's image is a's export: stacked on it.
  b: loadManifestText('/m/b.yaml', doc('b', 'b', '/srv/a.raw', '/srv/b.raw')),
  c: loadManifestText('/m/c.yaml', doc('c', 'c', '/srv/c.qcow2', '/srv/c.raw')),
  // d exports onto c's image path: c's node reads through d's mount.
  d: loadManifestText('/m/d.yaml', doc('d', 'd', '/srv/d.qcow2', '/srv/c.qcow2')),
};
const all = desiredFromManifests(Object.values(files));

test("a change's scope is its own names, not the other manifests'", () => {
  const unrelated = loadManifestText('/m/e.yaml', doc('e', 'e', '/srv/e.qcow2', '/srv/e.raw'));
  const s = scopeOfChange([unrelated], desiredFromManifests([...Object.values(files), unrelated]));
  assert.deepEqual([...s.exports].sort(), ['e']);
  assert.ok([...s.nodes].every((n) => !['a', 'b', 'c', 'd'].some((x) => n.startsWith(x))));
});

test('an export stacked on a changed export, and the export a changed node reads through, are in scope', () => {
  assert.deepEqual([...scopeOfChange([files.a], all).exports].sort(), ['a', 'b']);
  assert.deepEqual([...scopeOfChange([files.b], all).exports].sort(), ['a', 'b']);
  assert.deepEqual([...scopeOfChange([files.c], all).exports].sort(), ['c', 'd']);
  assert.deepEqual([...scopeOfChange([files.d], all).exports].sort(), ['c', 'd']);
});

test('a removed version still names what it had (so the plan removes it)', () => {
  const rest = desiredFromManifests([files.c, files.d]);
  const s = scopeOfChange([files.a], rest);
  assert.deepEqual([...s.exports].sort(), ['a']);
  assert.ok(s.nodes.size > 0);
});
