/**
 * `overlay: ephemeral` in manifests: what the shorthand expands to (the image
 * read-only and shared, the export writable), what is refused and why, and
 * what the plan shows (a change of `overlay` replaces the export).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { loadManifestText } from '../../src/manifest/index.js';
import type { ExportOptions } from '../../src/manifest/types.js';
import { renderPlan } from '../../src/reconcile/render.js';
import { desiredOf, fileNode, formatNode, fuseExport, observedOf, plan } from '../reconcile/helpers.js';

const HEAD = 'apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: m\nspec:\n';

function load(spec: string) {
  return loadManifestText('m.yaml', HEAD + spec);
}

function problems(spec: string): string[] {
  return load(spec).problems.map((p) => p.message);
}

test('shorthand: the image nodes read-only with force-share, the export writable with the overlay', () => {
  const m = load(`  exports:
    - id: golden
      image: /img/golden.qcow2
      overlay: ephemeral
`);
  assert.deepEqual(m.problems, []);
  const doc = m.documents[0]!;
  assert.deepEqual(
    doc.nodes.map((n) => n.options),
    [
      {
        'node-name': 'golden-file',
        driver: 'file',
        'read-only': true,
        filename: '/img/golden.qcow2',
        locking: 'auto',
        'force-share': true,
      },
      {
        'node-name': 'golden-fmt',
        driver: 'auto',
        'read-only': true,
        file: 'golden-file',
        unresolved: ['driver'],
      },
    ],
  );
  const e = doc.exports[0]!.options;
  assert.equal(e.writable, true, 'an overlay export is writable by definition');
  assert.equal(e.overlay, 'ephemeral');
  // writable: true says the same thing again: accepted.
  assert.deepEqual(
    problems(`  exports:
    - id: golden
      image: /img/golden.qcow2
      overlay: ephemeral
      writable: true
`),
    [],
  );
});

test('refused: writable: false, growable, other overlay kinds, an overlay over writable nodes, the qemu engine', () => {
  const shorthand = (extra: string) => `  exports:
    - id: g
      image: /img/g.qcow2
      overlay: ephemeral
${extra}`;
  const [ro] = problems(shorthand('      writable: false\n'));
  assert.match(ro!, /overlay: ephemeral is a writable view.*writable: false contradicts it/);
  const [grow] = problems(shorthand('      writable: true\n      growable: true\n'));
  assert.match(grow!, /keeps the image's size.*growable: true is refused/);
  assert.equal(
    problems(`  exports:
    - id: g
      image: /img/g.qcow2
      overlay: persistent
`).length,
    1,
  );
  const longForm = (ro: boolean) => `  blockdevs:
    - node-name: p
      driver: file
      filename: /img/g.qcow2
      read-only: ${ro}
      force-share: ${ro}
    - node-name: q
      driver: qcow2
      file: p
      read-only: ${ro}
  exports:
    - id: g
      node-name: q
      mountpoint: /img/g.raw
      overlay: ephemeral
`;
  assert.deepEqual(problems(longForm(true)), []);
  const writableNodes = problems(longForm(false));
  assert.ok(
    writableNodes.some((p) => /overlay export "g" over writable node "q".*set read-only: true/.test(p)),
    writableNodes.join('\n'),
  );
  // force-share on a node that may be written.
  const shared = problems(longForm(false).replace('force-share: false', 'force-share: true'));
  assert.ok(
    shared.some((p) => /force-share is for read-only nodes.*set read-only: true on "p"/.test(p)),
    shared.join('\n'),
  );
  const [qemu] = problems(`  engine: qemu\n${shorthand('')}`);
  assert.match(qemu!, /overlay: ephemeral needs the native engine/);
});

test('plan: the overlay is shown; the nodes stay read-only; changing overlay replaces the export', () => {
  const file = fileNode('p', '/img/g.qcow2', { 'read-only': true, 'force-share': true });
  const fmt = formatNode('q', 'qcow2', 'p', { 'read-only': true });
  const overlay: ExportOptions = fuseExport('g', 'q', '/img/g.raw', { writable: true, overlay: 'ephemeral' });
  const text = renderPlan(plan(desiredOf([file, fmt], [overlay]), { nodes: [], exports: [] }));
  assert.match(text, /\+ node p \(file\) \/img\/g\.qcow2 force-share read-only/);
  assert.match(
    text,
    /\+ export g \(fuse\) \/img\/g\.raw writable into an ephemeral overlay \(image read-only\)/,
  );
  // The nodes under an overlay export are opened read-only even when the manifest allows writing.
  const open = observedOf([fileNode('p', '/img/g.qcow2'), formatNode('q', 'qcow2', 'p')], [overlay]);
  assert.deepEqual(
    open.nodes.map((n) => n.options['read-only']),
    [true, true],
  );
  const plain = fuseExport('g', 'q', '/img/g.raw', { writable: true });
  const p = plan(desiredOf([file, fmt], [plain]), observedOf([file, fmt], [overlay]));
  const removed = p.steps.find((s) => s.action === 'remove-export');
  assert.ok(removed && removed.action === 'remove-export' && removed.replace, renderPlan(p));
  assert.match(renderPlan(p), /-\/\+ export g \(replace: overlay changed\)/);
});
