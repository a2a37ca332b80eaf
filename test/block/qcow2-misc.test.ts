/** qcow2 details beyond byte equality: refcounts, block status, backing options, info output, read-only. */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { renameSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/index.js';
import { imageInfoJson, renderInfo } from '../../src/cli/commands/info.js';
import { isBlkError } from '../../src/errors.js';
import { missingTools, qemuImg, REPO, tempDir } from '../helpers/tools.js';
import { applyWrites, createQcow2, K, M } from './images.js';

const code = (e: unknown) => (isBlkError(e) ? e.code : String(e));

describe('qcow2 details', () => {
  const missing = missingTools('qemu-img', 'qemu-io');
  const skip = missing.length ? `missing: ${missing.join(', ')}` : false;

  test('block status: data, zero, unallocated, and backing data', { skip }, async (t) => {
    const dir = tempDir(t);
    const base = createQcow2(join(dir, 'base.qcow2'), 4 * M, {});
    applyWrites(dir, base, 'qcow2', [{ off: 2 * M, len: 64 * K, kind: 'data' }], 1);
    const img = createQcow2(join(dir, 'img.qcow2'), 4 * M, {}, ['base.qcow2', 'qcow2']);
    applyWrites(
      dir,
      img,
      'qcow2',
      [
        { off: 0, len: 128 * K, kind: 'data' },
        { off: 1 * M, len: 64 * K, kind: 'zero' },
      ],
      2,
    );
    const o = await openImage({ filename: img, readOnly: true });
    t.after(() => o.close());
    assert.deepEqual(await o.node.blockStatus(0, 4 * M), {
      offset: 0,
      length: 128 * K,
      data: true,
      zero: false,
      depth: 1,
    });
    const z = await o.node.blockStatus(1 * M, 4 * M);
    assert.equal(z.zero, true);
    assert.equal(z.data, false);
    assert.equal(z.depth, 1); // a zero cluster of this image hides the backing file
    const b = await o.node.blockStatus(2 * M, 64 * K);
    assert.equal(b.data, true);
    assert.equal(b.depth, 2);
    const hole = await o.node.blockStatus(3 * M, 64 * K);
    assert.deepEqual([hole.data, hole.zero, hole.depth], [false, true, 0]);
    await assert.rejects(o.node.blockStatus(4 * M, 1), (e) => code(e) === 'OUT_OF_RANGE');
  });

  test('many concurrent reads missing on one L2 table load it once', { skip }, async (t) => {
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'img.qcow2'), 64 * M, {});
    applyWrites(dir, img, 'qcow2', [{ off: 0, len: 4 * M, kind: 'data' }], 9);
    const o = await openImage({ filename: img, readOnly: true, l2CacheBytes: 64 * K });
    t.after(() => o.close());
    const { qcow2CacheStats } = await import('../../src/block/format/qcow2/inspect.js');
    await Promise.all(
      Array.from({ length: 64 }, (_, i) => o.node.read(i * 64 * K + 100, Buffer.alloc(1000))),
    );
    const st = qcow2CacheStats(o.node);
    assert.equal(st.loads, 1);
    assert.ok(st.bytes <= 64 * K);
  });

  test('the image stays readable through its fd after its name is replaced (mount over the image)', {
    skip,
  }, async (t) => {
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'img.qcow2'), 1 * M, {});
    applyWrites(dir, img, 'qcow2', [{ off: 0, len: 64 * K, kind: 'data' }], 10);
    const o = await openImage({ filename: img, readOnly: true });
    t.after(() => o.close());
    const before = Buffer.alloc(64 * K);
    await o.node.read(0, before);
    renameSync(createQcow2(join(dir, 'other.qcow2'), 1 * M, {}), img);
    const after = Buffer.alloc(64 * K);
    await o.node.read(0, after);
    assert.ok(after.equals(before));
    assert.ok(!after.equals(Buffer.alloc(64 * K)));
  });

  test('backing: none reads zeroes where the backing file had data', { skip }, async (t) => {
    const dir = tempDir(t);
    const base = createQcow2(join(dir, 'base.qcow2'), 1 * M, {});
    applyWrites(dir, base, 'qcow2', [{ off: 0, len: 64 * K, kind: 'data' }], 3);
    const img = createQcow2(join(dir, 'img.qcow2'), 1 * M, {}, ['base.qcow2', 'qcow2']);
    const follow = await openImage({ filename: img, readOnly: true });
    const none = await openImage({ filename: img, readOnly: true, backing: 'none' });
    t.after(async () => {
      await follow.close();
      await none.close();
    });
    const a = Buffer.alloc(64 * K);
    const b = Buffer.alloc(64 * K, 1);
    await follow.node.read(0, a);
    await none.node.read(0, b);
    assert.ok(!a.equals(Buffer.alloc(64 * K)));
    assert.ok(b.equals(Buffer.alloc(64 * K)));
    assert.equal(follow.node.children.length, 2);
    assert.equal(none.node.children.length, 1);
    // A backing file outside the allowed roots is refused.
    await assert.rejects(
      openImage({ filename: img, readOnly: true, allowedRoots: [join(dir, 'nowhere')] }),
      (e) => code(e) === 'BACKING_POLICY',
    );
  });

  test('a read-only qcow2 node refuses writes until it is reopened read-write', { skip }, async (t) => {
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'img.qcow2'), 1 * M, {});
    const o = await openImage({ filename: img, readOnly: true });
    t.after(() => o.close());
    assert.equal(o.node.readOnly, true);
    assert.equal(o.node.capabilities().write, false);
    await assert.rejects(o.node.write(0, Buffer.alloc(1)), (e) => code(e) === 'READ_ONLY');
    await o.node.reopen({ readOnly: false });
    assert.equal(o.node.capabilities().write, true);
    await o.node.write(0, Buffer.alloc(1, 7));
  });

  test('refcounts read for every refcount width', { skip }, async (t) => {
    const dir = tempDir(t);
    for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
      const img = createQcow2(join(dir, `r${bits}.qcow2`), 1 * M, { refcount_bits: String(bits) });
      applyWrites(dir, img, 'qcow2', [{ off: 0, len: 64 * K, kind: 'data' }], bits);
      if (bits > 1) qemuImg('snapshot', '-c', 's', img); // 1-bit refcounts cannot count a snapshot
      const o = await openImage({ filename: img, readOnly: true });
      // reach into the driver state through a read-only probe of the refcount reader
      const { qcow2Refcount } = await import('../../src/block/format/qcow2/inspect.js');
      assert.equal(await qcow2Refcount(o.node, 0), 1, `header refcount, ${bits} bits`);
      const dataRef = await qcow2Refcount(o.node, -1);
      assert.equal(dataRef, bits === 1 ? 1 : 2, `data cluster after a snapshot, ${bits} bits`);
      await o.close();
    }
  });

  test('info: human text, JSON with snapshots, and --backing-chain', { skip }, async (t) => {
    const dir = tempDir(t);
    const base = createQcow2(join(dir, 'base.qcow2'), 2 * M, { cluster_size: '4k' });
    const img = createQcow2(join(dir, 'img.qcow2'), 4 * M, {}, ['base.qcow2', 'qcow2']);
    qemuImg('snapshot', '-c', 'before-upgrade', img);
    const [d] = await imageInfoJson(img);
    assert.equal(d!['backing-filename'], 'base.qcow2');
    assert.equal(d!['full-backing-filename'], join(dir, 'base.qcow2'));
    assert.equal((d!.snapshots as { name: string }[])[0]!.name, 'before-upgrade');
    const text = renderInfo(d!);
    assert.match(text, /file format: qcow2/);
    assert.match(text, /virtual size: 4 MiB \(4194304 bytes\)/);
    assert.match(text, /backing file format: qcow2/);
    assert.match(text, /before-upgrade/);
    const chain = await imageInfoJson(img, { backingChain: true });
    assert.equal(chain.length, 2);
    assert.equal(chain[1]!['cluster-size'], 4096);
    assert.equal(chain[1]!.filename, join(dir, 'base.qcow2'));
    void base;
    // the real command line
    const r = spawnSync(
      process.execPath,
      ['--import', 'tsx', join(REPO, 'test/block/fixtures-cli.mts'), 'info', '-o', 'json', img],
      {
        encoding: 'utf8',
      },
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(JSON.parse(r.stdout)['virtual-size'], 4 * M);
    const bad = spawnSync(
      process.execPath,
      ['--import', 'tsx', join(REPO, 'test/block/fixtures-cli.mts'), 'info', join(dir, 'missing')],
      {
        encoding: 'utf8',
      },
    );
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /missing/);
  });
});
