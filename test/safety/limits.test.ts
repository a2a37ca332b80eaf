/**
 * Resource bounds of the agent: the export cap (unit and live, with a place
 * freed for a waiting export), and a live export that answers EIO (a
 * corrupt L2 entry) showing `failed` with its error count while it keeps
 * serving its good ranges and its sibling keeps serving everything.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { exportsOverCap, IoErrorWatch, withoutExports } from '../../src/agent/limits.js';
import type { Desired } from '../../src/reconcile/model.js';
import { agentDir, startAgent, until } from '../helpers/agent.js';
import { needTools, qemuImg, qemuIo, run } from '../helpers/tools.js';

interface ExportStatus {
  id: string;
  state: string;
  reason: string;
}

function manifest(name: string, exports: string): string {
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n  exports:\n${exports}`;
}

function exp(id: string, image: string, format = 'raw'): string {
  return `    - id: ${id}\n      image: ${image}\n      format: ${format}\n      mountpoint: ${image}.mnt\n      create-mountpoint: true\n`;
}

describe('agent limits', { concurrency: false }, () => {
  test('exportsOverCap: served exports keep their place, new ones fill the rest in order', () => {
    assert.deepEqual([...exportsOverCap(['a', 'b', 'c'], new Set(), 2).keys()], ['c']);
    assert.deepEqual([...exportsOverCap(['a', 'b', 'c'], new Set(['c']), 2).keys()], ['b']);
    assert.deepEqual([...exportsOverCap(['a', 'b'], new Set(['a', 'b']), 1).keys()], []);
    assert.match(exportsOverCap(['a'], new Set(), 0).get('a')!, /at most 0 exports \(--max-exports\)/);
  });

  test('withoutExports drops the nodes only the dropped exports need', () => {
    const origin = { manifest: 'm', file: 'm.yaml', document: 0 } as unknown as Desired['nodes'][0]['origin'];
    const node = (name: string, file?: string) => ({
      options: {
        'node-name': name,
        driver: file ? 'raw' : 'file',
        ...(file ? { file } : { filename: `/i/${name}` }),
      },
      origin,
    });
    const ex = (id: string, n: string) => ({
      options: { type: 'fuse', id, 'node-name': n, mountpoint: `/m/${id}` },
      origin,
      shorthand: false,
    });
    const d = {
      nodes: [node('f'), node('a', 'f'), node('b', 'f'), node('g'), node('c', 'g')],
      exports: [ex('A', 'a'), ex('B', 'b'), ex('C', 'c')],
    } as unknown as Desired;
    const r = withoutExports(d, new Set(['B', 'C']));
    assert.deepEqual(
      r.exports.map((e) => e.options.id),
      ['A'],
    );
    assert.deepEqual(
      r.nodes.map((n) => n.options['node-name']),
      ['f', 'a'],
    );
  });

  test('IoErrorWatch: failing while the counter rose within the window, healthy after', () => {
    const w = new IoErrorWatch(1000);
    assert.equal(w.observe('x', 0, 0), undefined);
    assert.match(w.observe('x', 3, 100)!, /^I\/O errors: 3 since 1970-01-01T00:00:00\.100Z/);
    assert.match(w.observe('x', 5, 900)!, /^I\/O errors: 5 since/);
    assert.match(w.observe('x', 5, 1800)!, /^I\/O errors: 5 since/);
    assert.equal(w.observe('x', 5, 2000), undefined);
    assert.match(w.observe('x', 6, 2100)!, /^I\/O errors: 1 since 1970-01-01T00:00:02\.100Z/);
    assert.equal(w.observe('x', undefined, 2200), undefined);
    // Why the last failing request failed is shown with the count.
    w.observe('y', 0, 0);
    assert.match(w.observe('y', 1, 10, 'write: refused')!, /the rest is served\); last: write: refused$/);
  });

  test('agent --max-exports 2: the third export is refused with the reason, and served once a place is free', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
    const d = agentDir(t);
    const imgs = ['a', 'b', 'c'].map((n) => join(d.images, `${n}.raw`));
    for (const i of imgs) writeFileSync(i, Buffer.alloc(64 * 1024));
    const file = join(d.manifests, 'three.yaml');
    writeFileSync(file, manifest('three', exp('a', imgs[0]!) + exp('b', imgs[1]!) + exp('c', imgs[2]!)));
    const agent = await startAgent(t, d, ['--max-exports', '2']);
    const status = async () =>
      new Map((await agent.get<{ exports: ExportStatus[] }>('/status')).exports.map((e) => [e.id, e]));
    const s = await until('a, b ready and c refused', async () => {
      const m = await status();
      return m.get('a')?.state === 'ready' && m.get('b')?.state === 'ready' && m.get('c')?.state === 'failed'
        ? m
        : undefined;
    });
    assert.match(s.get('c')!.reason, /refused: the agent serves at most 2 exports \(--max-exports\)/);
    writeFileSync(file, manifest('three', exp('b', imgs[1]!) + exp('c', imgs[2]!)));
    await until('c ready once a left', async () => (await status()).get('c')?.state === 'ready', 10_000);
  });

  test('an export answering EIO is failed in status with its error count; good ranges and the sibling still serve', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io', '/dev/fuse')) return;
    const d = agentDir(t);
    const good = join(d.images, 'good.qcow2');
    const bad = join(d.images, 'bad.qcow2');
    for (const p of [good, bad]) {
      qemuImg('create', '-q', '-f', 'qcow2', p, '1M');
      qemuIo('-f', 'qcow2', '-c', 'write -P 0x5a 0 128k', p);
    }
    // Cluster 1 of bad.qcow2 now points far past the end of the file: reads of it are corruption (EIO).
    const hdr = readFileSync(bad).subarray(0, 112);
    const l1 = Number(hdr.readBigUInt64BE(40));
    const fd = openSync(bad, 'r+');
    try {
      const e = Buffer.alloc(8);
      readSync(fd, e, 0, 8, l1);
      const l2 = Number(e.readBigUInt64BE(0) & 0x00fffffffffffe00n);
      e.writeBigUInt64BE((1n << 63n) | (1n << 40n));
      writeSync(fd, e, 0, 8, l2 + 8);
    } finally {
      closeSync(fd);
    }
    writeFileSync(
      join(d.manifests, 'pair.yaml'),
      manifest('pair', exp('good', good, 'qcow2') + exp('bad', bad, 'qcow2')),
    );
    const agent = await startAgent(t, d);
    const status = async () =>
      new Map((await agent.get<{ exports: ExportStatus[] }>('/status')).exports.map((e) => [e.id, e]));
    await until('both ready', async () => [...(await status()).values()].every((e) => e.state === 'ready'));

    const dd = (mnt: string, skip: number) =>
      run('dd', [
        `if=${mnt}`,
        'of=/dev/null',
        'bs=64k',
        `skip=${skip}`,
        'count=1',
        'iflag=direct',
        'status=none',
      ]);
    for (let i = 0; i < 3; i++) {
      const r = dd(`${bad}.mnt`, 1);
      assert.notEqual(r.status, 0);
      assert.match(r.stderr, /Input\/output error/);
    }
    const s = await until('bad failed in status', async () => {
      const m = await status();
      return m.get('bad')?.state === 'failed' ? m : undefined;
    });
    assert.match(s.get('bad')!.reason, /^I\/O errors: \d+ since \d{4}-/);
    assert.equal(s.get('good')!.state, 'ready');
    assert.equal(dd(`${bad}.mnt`, 0).status, 0, 'the good range of the failing export is still served');
    assert.equal(dd(`${good}.mnt`, 1).status, 0, 'the sibling serves');
  });
});
