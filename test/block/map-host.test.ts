/**
 * mapHostCached (the FUSE fast path's source of truth): bytes read from the
 * host extents it reports must equal what the node reads, on raw windows,
 * qcow2 images with zero/unmapped/discarded ranges, and a backing chain.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import type { BlockNode } from '../../src/block/types.js';
import { needTools, qemuIo, seededRandom, tempDir } from '../helpers/tools.js';
import { applyWrites, createQcow2, K, M, scatteredWrites } from './images.js';
import { readViaMap } from './read-via-map.js';

async function compareRandom(node: BlockNode, seed: number, rounds = 400): Promise<number> {
  const rand = seededRandom(seed);
  const size = node.length();
  let mapped = 0;
  for (let i = 0; i < rounds; i++) {
    const off = Math.floor(rand() * size);
    const len = Math.max(1, Math.min(size - off, 1 + Math.floor(rand() * 300 * K)));
    const want = Buffer.alloc(len);
    await node.read(off, want); // also warms the L2 cache
    const got = await readViaMap(node, off, len);
    if (got) {
      mapped++;
      assert.ok(got.equals(want), `mapped bytes differ at ${off}+${len}`);
    }
  }
  return mapped;
}

test('qcow2 with data, zero, unmapped and discarded ranges over a backing file maps to the right bytes', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 24 * M;
  const base = createQcow2(join(dir, 'base.qcow2'), size, { cluster_size: '65536' });
  applyWrites(dir, base, 'qcow2', scatteredWrites(1, size, 64 * K, 8 * M, 20), 1);
  const top = createQcow2(join(dir, 'top.qcow2'), size + 4 * M, { cluster_size: '65536' }, [base, 'qcow2']);
  const writes = scatteredWrites(2, size, 64 * K, 8 * M, 20);
  writes[3]!.kind = 'zero';
  writes[4]!.kind = 'zero-unmap';
  writes[5]!.kind = 'discard';
  applyWrites(dir, top, 'qcow2', writes, 2);
  const img = await openImage({ filename: top, readOnly: true });
  t.after(() => img.close());
  const mapped = await compareRandom(img.node, 7);
  assert.ok(mapped > 300, `most ranges map once their L2 tables are cached (${mapped})`);
});

test('a compressed cluster maps to its compressed bytes; a raw window maps with its offset', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t);
  const img0 = createQcow2(join(dir, 'c.qcow2'), 4 * M, { cluster_size: '65536' });
  // A pattern compresses (random data would be stored uncompressed by qemu-io).
  qemuIo('-f', 'qcow2', '-c', 'write -c -P 0xab 0 64k', '-c', 'write -P 0xcd 64k 2M', img0);
  const img = await openImage({ filename: img0, readOnly: true });
  t.after(() => img.close());
  await img.node.read(0, Buffer.alloc(4096));
  const [x] = img.node.mapHostCached?.(4096, 8192) ?? [];
  assert.ok(x && 'compressed' in x, 'the compressed cluster is described');
  assert.deepEqual(
    { ...x.compressed, fd: 0, host: 0 },
    { fd: 0, host: 0, clen: x.compressed.clen, clusterSize: 64 * K, skip: 4096, algorithm: 'zlib' },
  );
  assert.ok(
    (await readViaMap(img.node, 100, 64 * K + 100))?.equals(
      Buffer.alloc(64 * K + 100, 0xab).fill(0xcd, 64 * K - 100),
    ),
  );

  const win = await img.graph.openNode({
    driver: 'raw',
    nodeName: 'w',
    file: img.node.nodeName,
    offset: 64 * K,
    size: 2 * M,
  });
  const mapped = await compareRandom(win, 9, 100);
  assert.ok(mapped > 50);
});
