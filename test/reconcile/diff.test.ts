import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { loadManifestText } from '../../src/manifest/load.js';
import { desiredFromManifests } from '../../src/reconcile/desired.js';
import { EMPTY_OBSERVED, type Plan, type Step } from '../../src/reconcile/model.js';
import {
  deepFreeze,
  desiredOf,
  plan as diff,
  fileNode,
  formatNode,
  fuseExport,
  observedOf,
} from './helpers.js';

/** `add-node prot0`, `remove-export exp0 (replace)`: the order and kind of steps at a glance. */
function outline(plan: Plan): string[] {
  return plan.steps.map((s: Step) => {
    const name = 'node' in s ? s.node['node-name'] : s.export.id;
    const replace = 'replace' in s && s.replace ? ' (replace)' : '';
    return `${s.action} ${name}${replace}`;
  });
}

const IMG = '/srv/images/foo.qcow2';
const prot0 = fileNode('prot0', IMG);
const fmt0 = formatNode('fmt0', 'qcow2', 'prot0');
const exp0 = fuseExport('exp0', 'fmt0', IMG);

describe('diff: the reconciliation table (docs/agent.md)', () => {
  test('nothing desired, nothing observed: no steps', () => {
    const plan = diff(desiredOf([]), EMPTY_OBSERVED);
    assert.deepEqual(plan.steps, []);
    assert.deepEqual(plan.summary, { add: 0, reopen: 0, replace: 0, remove: 0, repair: 0, adopt: 0 });
  });

  test('new export / node: add nodes bottom-up, then the export', () => {
    // Declared parent first: the plan still opens the child first.
    const plan = diff(desiredOf([fmt0, prot0], [exp0]), EMPTY_OBSERVED);
    assert.deepEqual(outline(plan), ['add-node prot0', 'add-node fmt0', 'add-export exp0']);
    assert.deepEqual(plan.summary, { add: 3, reopen: 0, replace: 0, remove: 0, repair: 0, adopt: 0 });
    const add = plan.steps[2]!;
    assert.equal(add.action, 'add-export');
    assert.deepEqual(add.action === 'add-export' && add.origin, {
      file: 'm.yaml',
      line: 1,
      col: 7,
      path: '/spec/exports/0',
      manifest: 'm',
    });
  });

  test('a new export over nodes that are already open adds only the export', () => {
    const plan = diff(desiredOf([prot0, fmt0], [exp0]), observedOf([prot0, fmt0]));
    assert.deepEqual(outline(plan), ['add-export exp0']);
  });

  test('a new parent over an open child adds only the parent', () => {
    const plan = diff(desiredOf([prot0, fmt0]), observedOf([prot0]));
    assert.deepEqual(outline(plan), ['add-node fmt0']);
  });

  test('applied state: no steps (idempotent)', () => {
    const nodes = [prot0, fmt0, formatNode('part', 'partition', 'fmt0', { number: 1 })];
    const auto = formatNode('a-fmt', 'auto', 'a-file', { unresolved: ['driver'] });
    const all = [...nodes, fileNode('a-file', '/srv/a'), auto];
    const exports = [exp0, fuseExport('a', 'a-fmt', '/srv/a', { image: '/srv/a', format: 'auto' })];
    assert.deepEqual(diff(desiredOf(all, exports), observedOf(all, exports)).steps, []);
  });

  test('removed export / node: export first, then nodes top-down', () => {
    const plan = diff(desiredOf([]), observedOf([prot0, fmt0], [exp0]));
    assert.deepEqual(outline(plan), ['remove-export exp0', 'remove-node fmt0', 'remove-node prot0']);
    assert.deepEqual(plan.summary, { add: 0, reopen: 0, replace: 0, remove: 3, repair: 0, adopt: 0 });
    // Remove steps carry the observed options, so the engine knows what it closes.
    assert.deepEqual(plan.steps[0], { engine: 'native', action: 'remove-export', export: exp0 });
  });

  test('removed export only: the nodes stay', () => {
    const plan = diff(desiredOf([prot0, fmt0]), observedOf([prot0, fmt0], [exp0]));
    assert.deepEqual(outline(plan), ['remove-export exp0']);
  });

  for (const [option, from, to] of [
    ['writable', false, true],
    ['growable', false, true],
    ['allow-other', 'auto', 'on'],
  ] as const) {
    test(`export ${option} changed: reopen in place`, () => {
      const plan = diff(
        desiredOf([prot0, fmt0], [{ ...exp0, [option]: to }]),
        observedOf([prot0, fmt0], [{ ...exp0, [option]: from }]),
      );
      // A writable export needs its nodes writable: they are reopened first, bottom-up.
      const nodes = option === 'writable' ? ['reopen-node prot0', 'reopen-node fmt0'] : [];
      assert.deepEqual(outline(plan), [...nodes, 'reopen-export exp0']);
      const step = plan.steps.at(-1)!;
      assert.equal(step.action, 'reopen-export');
      assert.deepEqual(step.action === 'reopen-export' && step.changes, [{ option, from, to }]);
      assert.deepEqual(step.action === 'reopen-export' && step.export, { ...exp0, [option]: to });
      assert.deepEqual(plan.summary, {
        add: 0,
        reopen: 1 + nodes.length,
        replace: 0,
        remove: 0,
        repair: 0,
        adopt: 0,
      });
    });
  }

  test('node read-only changed (its last writer went away): reopen in place', () => {
    const plan = diff(desiredOf([prot0]), observedOf([prot0], [], 'mounted', { asIs: true }));
    assert.deepEqual(outline(plan), ['reopen-node prot0']);
    const step = plan.steps[0]!;
    assert.deepEqual(step.action === 'reopen-node' && step.changes, [
      { option: 'read-only', from: false, to: true },
    ]);
  });

  test('making an export writable: nodes turn writable bottom-up, then the export', () => {
    const ro = { 'read-only': true };
    const plan = diff(
      desiredOf([prot0, fmt0], [{ ...exp0, writable: true }]),
      observedOf(
        [
          { ...prot0, ...ro },
          { ...fmt0, ...ro },
        ],
        [exp0],
      ),
    );
    assert.deepEqual(outline(plan), ['reopen-node prot0', 'reopen-node fmt0', 'reopen-export exp0']);
  });

  test('making an export read-only: the export first, then nodes top-down', () => {
    const ro = { 'read-only': true };
    const plan = diff(
      desiredOf(
        [
          { ...prot0, ...ro },
          { ...fmt0, ...ro },
        ],
        [exp0],
      ),
      observedOf([prot0, fmt0], [{ ...exp0, writable: true }]),
    );
    assert.deepEqual(outline(plan), ['reopen-export exp0', 'reopen-node fmt0', 'reopen-node prot0']);
  });

  test('filename changed: replace the node and everything above it', () => {
    const plan = diff(
      desiredOf([fileNode('prot0', '/srv/images/bar.qcow2'), fmt0], [exp0]),
      observedOf([prot0, fmt0], [exp0]),
    );
    assert.deepEqual(outline(plan), [
      'remove-export exp0 (replace)',
      'remove-node fmt0 (replace)',
      'remove-node prot0 (replace)',
      'add-node prot0 (replace)',
      'add-node fmt0 (replace)',
      'add-export exp0 (replace)',
    ]);
    const reasons = plan.steps.map((s) => ('replace' in s ? s.replace?.reason : undefined));
    assert.deepEqual(reasons, [
      'node fmt0 replaced',
      'file prot0 replaced',
      'filename changed',
      'filename changed',
      'file prot0 replaced',
      'node fmt0 replaced',
    ]);
    const first = plan.steps.find((s) => s.action === 'remove-node' && s.node['node-name'] === 'prot0')!;
    assert.deepEqual('replace' in first && first.replace?.changes, [
      { option: 'filename', from: IMG, to: '/srv/images/bar.qcow2' },
    ]);
    assert.deepEqual(plan.summary, { add: 0, reopen: 0, replace: 3, remove: 0, repair: 0, adopt: 0 });
  });

  for (const [what, desiredNode, observedNode] of [
    ['driver', formatNode('fmt0', 'raw', 'prot0'), fmt0],
    ['file', formatNode('fmt0', 'qcow2', 'prot1'), fmt0],
    [
      'offset',
      formatNode('fmt0', 'raw', 'prot0', { offset: 1024 }),
      formatNode('fmt0', 'raw', 'prot0', { offset: 0 }),
    ],
    ['size', formatNode('fmt0', 'raw', 'prot0', { size: 4096 }), formatNode('fmt0', 'raw', 'prot0')],
    ['backing', formatNode('fmt0', 'qcow2', 'prot0', { backing: null }), fmt0],
  ] as const) {
    test(`${what} changed: replace (remove then add), the child stays`, () => {
      const nodes = [prot0, fileNode('prot1', '/srv/images/other.qcow2')];
      const plan = diff(
        desiredOf([...nodes, desiredNode], [exp0]),
        observedOf([...nodes, observedNode], [exp0]),
      );
      assert.deepEqual(outline(plan), [
        'remove-export exp0 (replace)',
        'remove-node fmt0 (replace)',
        'add-node fmt0 (replace)',
        'add-export exp0 (replace)',
      ]);
      const step = plan.steps[1]!;
      assert.equal(step.action === 'remove-node' && step.replace?.reason, `${what} changed`);
    });
  }

  test('mountpoint changed: replace the export only', () => {
    const plan = diff(
      desiredOf([prot0, fmt0], [{ ...exp0, mountpoint: '/srv/raw/foo' }]),
      observedOf([prot0, fmt0], [exp0]),
    );
    assert.deepEqual(outline(plan), ['remove-export exp0 (replace)', 'add-export exp0 (replace)']);
    const step = plan.steps[0]!;
    assert.equal(step.action === 'remove-export' && step.replace?.reason, 'mountpoint changed');
  });

  test("an export's node-name changed: replace the export, open the new node first", () => {
    const fmt1 = formatNode('fmt1', 'raw', 'prot0');
    const plan = diff(
      desiredOf([prot0, fmt0, fmt1], [{ ...exp0, 'node-name': 'fmt1' }]),
      observedOf([prot0, fmt0], [exp0]),
    );
    assert.deepEqual(outline(plan), [
      'remove-export exp0 (replace)',
      'add-node fmt1',
      'add-export exp0 (replace)',
    ]);
  });

  test('mutable and immutable changes together: replace wins, one step pair', () => {
    const plan = diff(
      desiredOf([prot0, fmt0], [{ ...exp0, writable: true, mountpoint: '/srv/raw/foo' }]),
      observedOf([prot0, fmt0], [exp0]),
    );
    assert.deepEqual(outline(plan), [
      'remove-export exp0 (replace)',
      'reopen-node prot0',
      'reopen-node fmt0',
      'add-export exp0 (replace)',
    ]);
    const step = plan.steps[0]!;
    // The reason names what forces the replacement; the changes list everything.
    assert.equal(step.action === 'remove-export' && step.replace?.reason, 'mountpoint changed');
    assert.deepEqual(step.action === 'remove-export' && step.replace?.changes, [
      { option: 'mountpoint', from: IMG, to: '/srv/raw/foo' },
      { option: 'writable', from: false, to: true },
    ]);
  });

  test('create-mountpoint alone changes nothing live', () => {
    const plan = diff(
      desiredOf([prot0, fmt0], [{ ...exp0, 'create-mountpoint': true }]),
      observedOf([prot0, fmt0], [exp0]),
    );
    assert.deepEqual(plan.steps, []);
  });

  for (const state of ['stale', 'unmounted'] as const) {
    test(`export ${state}: repair (clean the mount, mount again)`, () => {
      const plan = diff(desiredOf([prot0, fmt0], [exp0]), observedOf([prot0, fmt0], [exp0], state));
      assert.deepEqual(outline(plan), ['repair-export exp0']);
      assert.deepEqual(plan.summary, { add: 0, reopen: 0, replace: 0, remove: 0, repair: 1, adopt: 0 });
      const step = plan.steps[0]!;
      assert.equal(step.action === 'repair-export' && step.state, state);
    });
  }

  test('a stale export whose options changed in place is repaired with the new options', () => {
    const plan = diff(
      desiredOf([prot0, fmt0], [{ ...exp0, growable: true }]),
      observedOf([prot0, fmt0], [exp0], 'stale'),
    );
    assert.deepEqual(outline(plan), ['repair-export exp0']);
    const step = plan.steps[0]!;
    assert.equal(
      step.action === 'repair-export' && step.export.type === 'fuse' && step.export.growable,
      true,
    );
    assert.deepEqual(step.action === 'repair-export' && step.changes, [
      { option: 'growable', from: false, to: true },
    ]);
  });

  test('a stale export that must be replaced or removed is not repaired', () => {
    const moved = diff(
      desiredOf([prot0, fmt0], [{ ...exp0, mountpoint: '/x' }]),
      observedOf([prot0, fmt0], [exp0], 'stale'),
    );
    assert.deepEqual(outline(moved), ['remove-export exp0 (replace)', 'add-export exp0 (replace)']);
    const gone = diff(desiredOf([prot0, fmt0]), observedOf([prot0, fmt0], [exp0], 'stale'));
    assert.deepEqual(outline(gone), ['remove-export exp0']);
  });
});

describe('diff: ordering and cascades', () => {
  const base = formatNode('base', 'qcow2', 'base-file', { backing: null, 'read-only': true });
  const baseFile = fileNode('base-file', '/srv/base.qcow2', { 'read-only': true });
  const mid = formatNode('mid', 'qcow2', 'mid-file', { backing: 'base' });
  const midFile = fileNode('mid-file', '/srv/mid.qcow2');
  const top = formatNode('top', 'qcow2', 'top-file', { backing: 'mid' });
  const topFile = fileNode('top-file', '/srv/top.qcow2');
  const chain = [baseFile, base, midFile, mid, topFile, top];
  const expTop = fuseExport('top', 'top', '/srv/top.qcow2');
  const expBase = fuseExport('base', 'base', '/srv/base.raw');

  test('a backing chain opens bottom-up and closes top-down', () => {
    const add = diff(desiredOf([...chain].reverse(), [expTop]), EMPTY_OBSERVED);
    const order = outline(add).map((l) => l.replace(/^add-(node|export) /, ''));
    for (const [child, parent] of [
      ['base-file', 'base'],
      ['base', 'mid'],
      ['mid-file', 'mid'],
      ['mid', 'top'],
      ['top-file', 'top'],
    ]) {
      assert.ok(order.indexOf(child!) < order.indexOf(parent!), `${child} before ${parent}: ${order}`);
    }
    assert.equal(order.at(-1), 'top');
    const remove = diff(desiredOf([]), observedOf(chain, [expTop]));
    const rorder = outline(remove).map((l) => l.replace(/^remove-(node|export) /, ''));
    assert.equal(rorder[0], 'top');
    for (const [child, parent] of [
      ['base', 'mid'],
      ['mid', 'top'],
      ['top-file', 'top'],
    ]) {
      assert.ok(
        rorder.lastIndexOf(child!) > rorder.lastIndexOf(parent!),
        `${parent} before ${child}: ${rorder}`,
      );
    }
  });

  test('replacing a middle node replaces its parents through backing, not its children or siblings', () => {
    const moved = fileNode('mid-file', '/srv/mid2.qcow2');
    const exports = [expTop, expBase];
    const plan = diff(
      desiredOf([baseFile, base, moved, mid, topFile, top], exports),
      observedOf(chain, exports),
    );
    assert.deepEqual(outline(plan), [
      'remove-export top (replace)',
      'remove-node top (replace)',
      'remove-node mid (replace)',
      'remove-node mid-file (replace)',
      'add-node mid-file (replace)',
      'add-node mid (replace)',
      'add-node top (replace)',
      'add-export top (replace)',
    ]);
    const topRemoval = plan.steps[1]!;
    assert.equal(topRemoval.action === 'remove-node' && topRemoval.replace?.reason, 'backing mid replaced');
  });

  test('removed parent over a kept child: only the parent goes', () => {
    const plan = diff(desiredOf([prot0]), observedOf([prot0, fmt0]));
    assert.deepEqual(outline(plan), ['remove-node fmt0']);
  });

  test('mixed plan: removals, reopens, additions and repairs in phase order', () => {
    const old = fileNode('old0', '/srv/old.raw');
    const oldExp = fuseExport('old', 'old0', '/srv/old.raw');
    const news = fileNode('new0', '/srv/new.raw');
    const newExp = fuseExport('new', 'new0', '/srv/new.raw');
    const other = fileNode('oth0', '/srv/oth.raw');
    const othExp = fuseExport('oth', 'oth0', '/srv/oth.raw');
    const plan = diff(desiredOf([prot0, fmt0, news, other], [{ ...exp0, writable: true }, newExp, othExp]), {
      nodes: observedOf([prot0, fmt0, old, other]).nodes,
      exports: [
        { options: exp0, state: 'mounted' },
        { options: oldExp, state: 'mounted' },
        { options: othExp, state: 'stale' },
      ],
    });
    assert.deepEqual(outline(plan), [
      'remove-export old',
      'remove-node old0',
      'reopen-node prot0',
      'reopen-node fmt0',
      'reopen-export exp0',
      'add-node new0',
      'add-export new',
      'repair-export oth',
    ]);
    assert.deepEqual(plan.summary, { add: 2, reopen: 3, replace: 0, remove: 2, repair: 1, adopt: 0 });
  });
});

describe('diff: purity', () => {
  test('inputs are not mutated and the same inputs give the same plan', () => {
    const desired = deepFreeze(
      desiredOf([fileNode('prot0', '/srv/images/bar.qcow2'), fmt0], [{ ...exp0, writable: true }]),
    );
    const observed = deepFreeze(observedOf([prot0, fmt0], [exp0]));
    const a = diff(desired, observed);
    const b = diff(desired, observed);
    assert.deepEqual(a, b);
    assert.ok(a.steps.length > 0);
  });
});

describe('diff: from manifests', () => {
  const manifest = (writable: boolean, extra = '') =>
    `apiVersion: blkexport/v1
kind: ExportSet
metadata: { name: s }
spec:
  exports:
    - id: foo
      image: /srv/images/foo.qcow2
      writable: ${writable}${extra}
`;

  test('a shorthand export adds its expanded graph: file, format (resolved when applied), export', () => {
    const desired = desiredFromManifests([loadManifestText('s.yaml', manifest(false))]);
    const plan = diff(desired, EMPTY_OBSERVED);
    assert.deepEqual(outline(plan), ['add-node foo-file', 'add-node foo-fmt', 'add-export foo']);
    const fmt = plan.steps[1]!;
    assert.deepEqual(fmt.action === 'add-node' && fmt.node.unresolved, ['driver']);
    assert.equal(fmt.action === 'add-node' && fmt.origin.generatedFor, 'shorthand export foo');
    assert.deepEqual(fmt.action === 'add-node' && [fmt.origin.file, fmt.origin.line, fmt.origin.col], [
      's.yaml',
      6,
      7,
    ]);
  });

  test('a shorthand export turned writable reopens its nodes and itself in place', () => {
    const before = desiredFromManifests([loadManifestText('s.yaml', manifest(false))]);
    const after = desiredFromManifests([loadManifestText('s.yaml', manifest(true))]);
    const observed = {
      nodes: before.nodes.map((n) => ({ options: n.options })),
      exports: before.exports.map((e) => ({ options: e.options, state: 'mounted' as const })),
    };
    const plan = diff(after, observed);
    assert.deepEqual(outline(plan), ['reopen-node foo-file', 'reopen-node foo-fmt', 'reopen-export foo']);
  });

  test('a shorthand export given a partition gains a window node; the export is replaced', () => {
    const before = desiredFromManifests([loadManifestText('s.yaml', manifest(false))]);
    const after = desiredFromManifests([loadManifestText('s.yaml', manifest(false, '\n      partition: 1'))]);
    const observed = {
      nodes: before.nodes.map((n) => ({ options: n.options })),
      exports: before.exports.map((e) => ({ options: e.options, state: 'mounted' as const })),
    };
    assert.deepEqual(outline(diff(after, observed)), [
      'remove-export foo (replace)',
      'add-node foo-part',
      'add-export foo (replace)',
    ]);
  });

  test('hosts: documents for other hosts are not desired', () => {
    const text = manifest(false).replace('spec:\n', 'spec:\n  hosts: [hv-01]\n');
    const files = [loadManifestText('s.yaml', text)];
    assert.equal(desiredFromManifests(files, { hostname: 'hv-01' }).exports.length, 1);
    assert.equal(desiredFromManifests(files, { hostname: 'hv-02' }).exports.length, 0);
  });

  test('invalid manifests contribute nothing', () => {
    const files = [loadManifestText('s.yaml', manifest(false).replace('writable: false', 'writable: nope'))];
    assert.deepEqual(desiredFromManifests(files), { nodes: [], exports: [] });
  });
});
