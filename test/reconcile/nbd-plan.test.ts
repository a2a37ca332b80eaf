/**
 * `type: nbd` exports through expansion and the plan: the shorthand's
 * generated graph, the name defaulting to the id, plan lines like FUSE
 * exports', a changed name replacing the export, and an NBD export that
 * writes making its nodes writable while the FUSE export of the same node
 * stays read-only.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { nativeCapabilities } from '../../src/engine/native/capabilities.js';
import { loadManifestFile } from '../../src/manifest/index.js';
import type { ExportOptions } from '../../src/manifest/types.js';
import { desiredFromManifests } from '../../src/reconcile/desired.js';
import { diff } from '../../src/reconcile/diff.js';
import { EMPTY_OBSERVED, type Observed } from '../../src/reconcile/model.js';
import { renderPlan } from '../../src/reconcile/render.js';
import { REPO } from '../helpers/tools.js';

const FIXTURE = join(REPO, 'test', 'fixtures', 'manifests', 'valid', 'nbd.yaml');

function desired() {
  const f = loadManifestFile(FIXTURE);
  assert.ok(f.valid, f.problems.map((p) => p.format()).join('\n'));
  return desiredFromManifests([f]);
}

/** What an engine reports after applying every step of `plan` to nothing. */
function applied(d: ReturnType<typeof desired>): Observed {
  const plan = diff(d, EMPTY_OBSERVED, nativeCapabilities);
  const observed: Observed = { nodes: [], exports: [] };
  for (const s of plan.steps) {
    if (s.action === 'add-node') observed.nodes.push({ options: s.node });
    if (s.action === 'add-export') observed.exports.push({ options: s.export, state: 'mounted' });
  }
  return observed;
}

test('expansion: long form and shorthand NBD exports; name defaults to the id; no mountpoint', () => {
  const d = desired();
  const byId = new Map(d.exports.map((e) => [e.options.id, e.options]));
  assert.deepEqual(byId.get('a-nbd'), {
    type: 'nbd',
    id: 'a-nbd',
    'node-name': 'fmt0',
    writable: true,
    name: 'a',
    description: 'disk a, over NBD',
  });
  const b = byId.get('b')!;
  assert.equal(b.type, 'nbd');
  assert.equal(b.type === 'nbd' && b.name, 'b');
  assert.equal(b['node-name'], 'b-part');
  assert.ok(!('mountpoint' in b));
  const c = byId.get('c')!;
  assert.equal(c.overlay, 'ephemeral');
  assert.equal(c.writable, true);
  const cFile = d.nodes.find((n) => n.options['node-name'] === 'c-file')!.options;
  assert.equal(cFile['read-only'], true);
  assert.equal(cFile['force-share'], true);
});

test('plan: NBD exports read like FUSE ones; the NBD writer makes the shared node writable', () => {
  const d = desired();
  const plan = diff(d, EMPTY_OBSERVED, nativeCapabilities);
  const text = renderPlan(plan);
  assert.match(
    text,
    /^\+ export a-fuse \(fuse\) \/var\/lib\/blkexport\/images\/a\.qcow2 read-only \(node fmt0\) \[native\]$/m,
  );
  assert.match(
    text,
    /^\+ export a-nbd \(nbd\) nbd name "a" writable description="disk a, over NBD" \(node fmt0\) \[native\]$/m,
  );
  assert.match(
    text,
    /^\+ export b \(nbd\) nbd name "b" read-only \(node b-part; shorthand: image \/var\/lib\/blkexport\/images\/b\.qcow2, format qcow2, partition 1\) \[native\]$/m,
  );
  const fmt0 = plan.steps.find((s) => s.action === 'add-node' && s.node['node-name'] === 'fmt0');
  assert.equal(fmt0?.action === 'add-node' && fmt0.node['read-only'], false);
  // Exports come after the nodes under them.
  const order = plan.steps.map((s) =>
    s.action === 'add-export' ? s.export.id : s.action === 'add-node' ? s.node['node-name'] : '',
  );
  assert.ok(order.indexOf('a-nbd') > order.indexOf('fmt0'));
});

test('plan: applied, nothing changes; a new name replaces the NBD export; an NBD export not served is repaired', () => {
  const d = desired();
  const observed = applied(d);
  assert.equal(
    renderPlan(diff(d, observed, nativeCapabilities)),
    'No changes. The live state matches the manifests.\n',
  );
  const renamed = {
    ...d,
    exports: d.exports.map((e) =>
      e.options.id === 'a-nbd' ? { ...e, options: { ...e.options, name: 'a2' } as ExportOptions } : e,
    ),
  };
  const lines = renderPlan(diff(renamed, observed, nativeCapabilities)).split('\n');
  assert.ok(lines.includes('-/+ export a-nbd (replace: name changed) [native]'), lines.join('\n'));
  const gone: Observed = {
    ...observed,
    exports: observed.exports.map((e) =>
      e.options.id === 'b' ? { ...e, state: 'unmounted', reason: 'not in the NBD server' } : e,
    ),
  };
  const repair = renderPlan(diff(d, gone, nativeCapabilities));
  assert.match(repair, /^! export b nbd name "b" \(repair: not served, not in the NBD server\) \[native\]$/m);
});
