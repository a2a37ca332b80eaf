import assert from 'node:assert/strict';
import { test } from 'node:test';
import { EMPTY_OBSERVED } from '../../src/reconcile/model.js';
import { planToJson, renderPlan } from '../../src/reconcile/render.js';
import { desiredOf, plan as diff, fileNode, formatNode, fuseExport, observedOf } from './helpers.js';

const IMG = '/srv/images/foo.qcow2';
const prot0 = fileNode('prot0', IMG);
const fmt0 = formatNode('fmt0', 'qcow2', 'prot0');
const exp0 = fuseExport('exp0', 'fmt0', IMG, { writable: true });

test('additions read like a terraform plan', () => {
  const text = renderPlan(diff(desiredOf([prot0, fmt0], [exp0]), EMPTY_OBSERVED));
  assert.equal(
    text,
    [
      '+ node prot0 (file) /srv/images/foo.qcow2 [native]',
      '+ node fmt0 (qcow2) file=prot0 [native]',
      '+ export exp0 (fuse) /srv/images/foo.qcow2 writable (node fmt0) [native]',
      '',
      'Plan: 3 to add, 0 to change in place, 0 to replace, 0 to remove, 0 to repair.',
      '',
    ].join('\n'),
  );
});

test('reopen, remove, replace and repair lines', () => {
  const old0 = fileNode('old0', '/srv/old.raw');
  const x = fileNode('x', '/srv/x.raw');
  const expX = fuseExport('expx', 'x', '/srv/x.raw');
  const expY = fuseExport('expy', 'prot0', '/srv/y.raw');
  const plan = diff(desiredOf([prot0, fmt0, { ...x, filename: '/srv/x2.raw' }], [exp0, expX, expY]), {
    nodes: observedOf([prot0, fmt0, old0, x]).nodes,
    exports: [
      { options: { ...exp0, writable: false }, state: 'mounted' },
      { options: expX, state: 'mounted' },
      { options: expY, state: 'stale', reason: 'ENOTCONN' },
    ],
  });
  assert.deepEqual(renderPlan(plan).split('\n'), [
    '-/+ export expx (replace: node x replaced) [native]',
    '-/+ node x (replace: filename changed) [native]',
    '- node old0 [native]',
    '~ node prot0 read-only: true → false (reopen in place) [native]',
    '~ node fmt0 read-only: true → false (reopen in place) [native]',
    '~ export exp0 writable: false → true (reopen in place) [native]',
    '! export expy /srv/y.raw (repair: stale mount, ENOTCONN) [native]',
    '',
    'Plan: 0 to add, 3 to change in place, 2 to replace, 1 to remove, 1 to repair.',
    '',
  ]);
});

test('unresolved shorthand options are marked as resolved when applied', () => {
  const nodes = [
    fileNode('foo-file', IMG, { 'read-only': true }),
    formatNode('foo-fmt', 'auto', 'foo-file', { 'read-only': true, unresolved: ['driver'] }),
    formatNode('foo-part', 'partition', 'foo-fmt', { 'read-only': true, number: 1 }),
  ];
  const exp = fuseExport('foo', 'foo-part', IMG, { image: IMG, format: 'auto', partition: 1 });
  const lines = renderPlan(diff(desiredOf(nodes, [exp]), EMPTY_OBSERVED)).split('\n');
  assert.equal(
    lines[1],
    '+ node foo-fmt (format auto, resolved when applied) file=foo-file read-only [native]',
  );
  assert.equal(
    lines[2],
    '+ node foo-part (partition) file=foo-fmt number=1 (window read from the partition table) read-only [native]',
  );
  assert.equal(
    lines[3],
    '+ export foo (fuse) /srv/images/foo.qcow2 read-only (node foo-part; shorthand: image /srv/images/foo.qcow2, format auto, partition 1) [native]',
  );
});

test('no changes', () => {
  assert.equal(
    renderPlan(diff(desiredOf([prot0]), observedOf([prot0]))),
    'No changes. The live state matches the manifests.\n',
  );
});

test('JSON: {changes, summary, steps}; every step carries full options an engine can apply', () => {
  const json = planToJson(
    diff(desiredOf([prot0, fmt0], [exp0]), observedOf([prot0], [], 'mounted', { asIs: true })),
  );
  assert.deepEqual(Object.keys(json), ['changes', 'summary', 'steps']);
  assert.equal(json.changes, true);
  assert.deepEqual(json.summary, { add: 2, reopen: 0, replace: 0, remove: 0, repair: 0, adopt: 0 });
  assert.deepEqual(json.steps, [
    {
      engine: 'native',
      action: 'add-node',
      node: { 'node-name': 'fmt0', driver: 'qcow2', 'read-only': false, file: 'prot0' },
      origin: { file: 'm.yaml', line: 2, col: 7, path: '/spec/blockdevs/1', manifest: 'm' },
    },
    {
      engine: 'native',
      action: 'add-export',
      export: {
        type: 'fuse',
        id: 'exp0',
        'node-name': 'fmt0',
        mountpoint: IMG,
        'create-mountpoint': false,
        writable: true,
        growable: false,
        'allow-other': 'auto',
      },
      origin: { file: 'm.yaml', line: 1, col: 7, path: '/spec/exports/0', manifest: 'm' },
    },
  ]);
  // Plain data: survives a JSON round trip unchanged.
  assert.deepEqual(JSON.parse(JSON.stringify(json)), json);
  const none = planToJson(diff(desiredOf([prot0]), observedOf([prot0])));
  assert.deepEqual(none, {
    changes: false,
    summary: { add: 0, reopen: 0, replace: 0, remove: 0, repair: 0, adopt: 0 },
    steps: [],
  });
});

test('JSON: replace steps carry the reason and the option changes', () => {
  const json = planToJson(diff(desiredOf([{ ...prot0, filename: '/srv/b' }]), observedOf([prot0])));
  assert.deepEqual(json.steps[0], {
    engine: 'native',
    action: 'remove-node',
    node: { ...prot0, 'read-only': true },
    replace: { reason: 'filename changed', changes: [{ option: 'filename', from: IMG, to: '/srv/b' }] },
  });
  assert.equal(json.steps[1]!.action, 'add-node');
});
