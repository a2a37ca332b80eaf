/**
 * The plan decides, per engine: which nodes are writable, what each engine
 * changes in place and what it replaces, drift, and the order across engines.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { findDriver } from '../../src/block/registry.js';
import { nativeCapabilities } from '../../src/engine/native/capabilities.js';
import { qemuCapabilities } from '../../src/engine/qemu/capabilities.js';
import { fuseExportDriver } from '../../src/export/fuse/driver.js';
import { planEngines } from '../../src/reconcile/host-plan.js';
import { EMPTY_OBSERVED, type Plan, type Step } from '../../src/reconcile/model.js';
import { renderPlan } from '../../src/reconcile/render.js';
import { desiredOf, fileNode, formatNode, fuseExport, observedOf, plan } from './helpers.js';

function outline(p: Plan): string[] {
  return p.steps.map((s: Step) => {
    const name = 'node' in s ? s.node['node-name'] : s.export.id;
    return `${s.engine} ${s.action} ${name}${'replace' in s && s.replace ? ' (replace)' : ''}`;
  });
}

const IMG = '/srv/images/foo.qcow2';
const prot0 = fileNode('prot0', IMG);
const fmt0 = formatNode('fmt0', 'qcow2', 'prot0');
const part = formatNode('part', 'partition', 'fmt0', { number: 1 });

describe('plan: node writability comes from the writable exports', () => {
  test('nodes under only read-only exports open read-only, whatever read-only: false allows', () => {
    const p = plan(desiredOf([prot0, fmt0], [fuseExport('exp0', 'fmt0', IMG)]), EMPTY_OBSERVED);
    const nodes = p.steps.filter((s) => s.action === 'add-node');
    assert.deepEqual(
      nodes.map((s) => s.action === 'add-node' && s.node['read-only']),
      [true, true],
    );
  });

  test('a writable export opens its file chain writable; a sibling window and a backing node stay read-only', () => {
    const base = formatNode('base', 'qcow2', 'base-file', { backing: null });
    const baseFile = fileNode('base-file', '/srv/base.qcow2');
    const top = formatNode('fmt0', 'qcow2', 'prot0', { backing: 'base' });
    const p = plan(
      desiredOf(
        [baseFile, base, prot0, top, part],
        [fuseExport('w', 'fmt0', '/srv/w.raw', { writable: true }), fuseExport('r', 'part', '/srv/r.raw')],
      ),
      EMPTY_OBSERVED,
    );
    const ro = Object.fromEntries(
      p.steps.flatMap((s) => (s.action === 'add-node' ? [[s.node['node-name'], s.node['read-only']]] : [])),
    );
    assert.deepEqual(ro, { 'base-file': true, base: true, prot0: false, fmt0: false, part: true });
  });

  test('read-only: true is never overridden by a writable export (the engine then refuses the export)', () => {
    const p = plan(
      desiredOf(
        [{ ...prot0, 'read-only': true }, fmt0],
        [fuseExport('exp0', 'fmt0', IMG, { writable: true })],
      ),
      EMPTY_OBSERVED,
    );
    const first = p.steps[0]!;
    assert.equal(first.action === 'add-node' && first.node['read-only'], true);
  });
});

describe('plan: drift', () => {
  test('an image replaced under a live node replaces it and everything above it, with the reason', () => {
    const exp0 = fuseExport('exp0', 'fmt0', IMG);
    const observed = observedOf([prot0, fmt0], [exp0]);
    observed.nodes[0]!.drift = 'image file replaced';
    const p = plan(desiredOf([prot0, fmt0], [exp0]), observed);
    assert.deepEqual(outline(p), [
      'native remove-export exp0 (replace)',
      'native remove-node fmt0 (replace)',
      'native remove-node prot0 (replace)',
      'native add-node prot0 (replace)',
      'native add-node fmt0 (replace)',
      'native add-export exp0 (replace)',
    ]);
    assert.match(renderPlan(p), /^-\/\+ node prot0 \(replace: image file replaced\) \[native\]$/m);
  });
});

describe('plan: what each engine changes in place', () => {
  test('native capabilities are the drivers own declarations', () => {
    assert.deepEqual(nativeCapabilities.nodeMutable('qcow2'), findDriver('qcow2').mutableOptions);
    assert.deepEqual(nativeCapabilities.nodeMutable('partition'), findDriver('partition').mutableOptions);
    assert.deepEqual(nativeCapabilities.exportMutable('fuse'), fuseExportDriver.mutableOptions);
  });

  for (const [option, from, to] of [
    ['growable', false, true],
    ['allow-other', 'auto', 'off'],
  ] as const) {
    test(`qemu engine: ${option} changed is a remount (replace), native changes it in place`, () => {
      const exp0 = fuseExport('exp0', 'fmt0', '/srv/raw/foo');
      const desired = desiredOf([prot0, fmt0], [{ ...exp0, [option]: to }]);
      const observed = observedOf([prot0, fmt0], [{ ...exp0, [option]: from }]);
      assert.deepEqual(outline(plan(desired, observed)), ['native reopen-export exp0']);
      const q = plan(desired, observed, qemuCapabilities);
      assert.deepEqual(outline(q), ['qemu remove-export exp0 (replace)', 'qemu add-export exp0 (replace)']);
      assert.equal(
        renderPlan(q).split('\n')[0],
        `-/+ export exp0 (replace: ${option} changed; the qemu engine remounts to change it) [qemu]`,
      );
    });
  }

  test('qemu engine: a file node reopened under its own export is reopened with the export unmounted', () => {
    const exp0 = fuseExport('exp0', 'fmt0', IMG); // mounted over the image itself
    const desired = desiredOf([prot0, fmt0], [{ ...exp0, writable: true }]);
    const observed = observedOf([prot0, fmt0], [exp0]);
    assert.deepEqual(outline(plan(desired, observed, qemuCapabilities)), [
      'qemu remove-export exp0 (replace)',
      'qemu reopen-node prot0',
      'qemu reopen-node fmt0',
      'qemu add-export exp0 (replace)',
    ]);
    // The native engine reopens through its own descriptor: everything in place.
    assert.deepEqual(outline(plan(desired, observed)), [
      'native reopen-node prot0',
      'native reopen-node fmt0',
      'native reopen-export exp0',
    ]);
  });

  test('qemu engine: an export elsewhere stays mounted while its nodes are reopened', () => {
    const exp0 = fuseExport('exp0', 'fmt0', '/srv/raw/foo', { writable: true });
    const desired = desiredOf([prot0, fmt0], [{ ...exp0, writable: false }]);
    const observed = observedOf([prot0, fmt0], [exp0]);
    const q = plan(desired, observed, qemuCapabilities);
    assert.deepEqual(outline(q), [
      'qemu remove-export exp0 (replace)',
      'qemu reopen-node fmt0',
      'qemu reopen-node prot0',
      'qemu add-export exp0 (replace)',
    ]);
  });
});

describe('plan: several engines', () => {
  test('an export moving from native to qemu frees its mountpoint first; every step names its engine', () => {
    const exp0 = fuseExport('exp0', 'fmt0', IMG);
    const p = planEngines([
      { caps: qemuCapabilities, desired: desiredOf([prot0, fmt0], [exp0]), observed: EMPTY_OBSERVED },
      { caps: nativeCapabilities, desired: desiredOf([]), observed: observedOf([prot0, fmt0], [exp0]) },
    ]);
    assert.deepEqual(outline(p), [
      'native remove-export exp0',
      'native remove-node fmt0',
      'native remove-node prot0',
      'qemu add-node prot0',
      'qemu add-node fmt0',
      'qemu add-export exp0',
    ]);
    assert.deepEqual(p.summary, { add: 3, reopen: 0, replace: 0, remove: 3, repair: 0, adopt: 0 });
  });
});

describe('plan: exports a previous agent left held', () => {
  const exp0 = fuseExport('exp0', 'fmt0', '/srv/raw/foo');
  const held = (e = exp0) => ({
    nodes: [],
    exports: [{ options: e, state: 'held' as const, reason: 'held since T, mounted by pid 7' }],
  });

  test('a held export still desired is adopted once its nodes are open', () => {
    const p = plan(desiredOf([prot0, fmt0], [exp0]), held());
    assert.deepEqual(outline(p), [
      'native add-node prot0',
      'native add-node fmt0',
      'native adopt-export exp0',
    ]);
    assert.deepEqual(p.summary, { add: 2, reopen: 0, replace: 0, remove: 0, repair: 0, adopt: 1 });
    assert.match(
      renderPlan(p),
      /^> export exp0 \/srv\/raw\/foo \(adopt: held since T, mounted by pid 7\) \[native\]$/m,
    );
  });

  test('options changed in place while nobody served it are applied on adoption', () => {
    const p = plan(desiredOf([prot0, fmt0], [{ ...exp0, growable: true }]), held());
    const adopt = p.steps.at(-1)!;
    assert.equal(adopt.action, 'adopt-export');
    assert.deepEqual(adopt.action === 'adopt-export' && adopt.changes, [
      { option: 'growable', from: false, to: true },
    ]);
  });

  test('a held export no manifest wants is removed; one whose mountpoint changed is replaced', () => {
    assert.deepEqual(outline(plan(desiredOf([]), held())), ['native remove-export exp0']);
    const moved = plan(desiredOf([prot0, fmt0], [{ ...exp0, mountpoint: '/srv/raw/bar' }]), held());
    assert.deepEqual(outline(moved), [
      'native remove-export exp0 (replace)',
      'native add-node prot0',
      'native add-node fmt0',
      'native add-export exp0 (replace)',
    ]);
  });
});
