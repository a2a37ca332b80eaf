/**
 * Differencing vhdx chains. QEMU cannot make or read them (it refuses
 * has_parent), so they are made here from qemu-img-made dynamic images
 * (vhdx-images.ts: has_parent set, a parent locator added, a sector bitmap
 * block appended) and the expected bytes are worked out independently from
 * each image's BAT: fully present blocks from the image (`qemu-img convert`
 * of it before it became differencing), absent blocks from the parent, zero
 * and unmapped blocks as zeroes, partially present blocks sector by sector
 * from the bitmap.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, statSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/index.js';
import { imageInfoJson } from '../../src/cli/commands/info.js';
import { missingTools, randomBytes, seededRandom, tempDir } from '../helpers/tools.js';
import { applyWrites, convertToRaw, scatteredWrites } from './images.js';
import { readViaMap } from './read-via-map.js';
import {
  batEntry,
  createVhdx,
  dataWriteGuid,
  K,
  M,
  makeDifferencing,
  setBatEntry,
  writeAt,
} from './vhdx-images.js';

const SIZE = 24 * M;
const BLOCK = M;
/** Payload blocks per sector bitmap with 1 MiB blocks and 512-byte sectors. */
const CHUNK_RATIO = 4096;
const SECTORS = BLOCK / 512;

/**
 * A differencing image over `parentPath` (whose guest bytes are `parentBytes`):
 * writes, then the edits; returns the image path and its expected guest bytes.
 */
function diffImage(
  dir: string,
  name: string,
  parentPath: string,
  relative: string,
  parentBytes: Buffer,
  seed: number,
): { path: string; expected: Buffer } {
  const path = createVhdx(join(dir, name), SIZE, { block_size: '1M', block_state_zero: 'off' });
  applyWrites(dir, path, 'vhdx', scatteredWrites(seed, SIZE, BLOCK, 4 * BLOCK, 10), seed);
  const own = readFileSync(convertToRaw(path, join(dir, `${name}.raw`)));
  const present: number[] = [];
  const absent: number[] = [];
  for (let b = 0; b < SIZE / BLOCK; b++) (batEntry(path, b)[0] === 6 ? present : absent).push(b);
  assert.ok(present.length >= 3 && absent.length >= 3, `${present.length} present, ${absent.length} absent`);
  // One present block becomes partially present, one absent block explicitly zero, one unmapped.
  const partial = present[1]!;
  setBatEntry(path, partial, 7, batEntry(path, partial)[1]);
  setBatEntry(path, absent[0]!, 2, 0);
  setBatEntry(path, absent[1]!, 3, 0);
  // The chunk's sector bitmap: 1 MiB appended at a 1 MiB boundary; random bits for the partial block.
  const bitmapAt = Math.ceil(statSync(path).size / M) * M;
  truncateSync(path, bitmapAt + M);
  const bits = randomBytes(seededRandom(seed + 1), SECTORS / 8);
  writeAt(path, bitmapAt + (partial * SECTORS) / 8, bits);
  setBatEntry(path, CHUNK_RATIO, 6, bitmapAt);
  makeDifferencing(path, [
    ['parent_linkage', dataWriteGuid(parentPath)],
    ['absolute_win32_path', 'C:\\vms\\parent.vhdx'],
    ['relative_path', relative],
  ]);
  const expected = Buffer.alloc(SIZE);
  for (let b = 0; b < SIZE / BLOCK; b++) {
    const [a, z] = [b * BLOCK, (b + 1) * BLOCK];
    if (present.includes(b) && b !== partial) own.copy(expected, a, a, z);
    else if (absent.slice(2).includes(b)) parentBytes.copy(expected, a, a, z);
  }
  for (let s = 0; s < SECTORS; s++) {
    const a = partial * BLOCK + s * 512;
    const src = (bits[s >> 3]! >> (s & 7)) & 1 ? own : parentBytes;
    src.copy(expected, a, a, a + 512);
  }
  return { path, expected };
}

/** base (dynamic) <- mid (differencing) <- sub/top (differencing). */
function chain(dir: string) {
  const base = createVhdx(join(dir, 'base.vhdx'), SIZE, { block_size: '1M' });
  applyWrites(dir, base, 'vhdx', scatteredWrites(50, SIZE, BLOCK, 4 * BLOCK, 20), 50);
  const baseBytes = readFileSync(convertToRaw(base, join(dir, 'base.raw')));
  const mid = diffImage(dir, 'mid.vhdx', base, '.\\base.vhdx', baseBytes, 51);
  mkdirSync(join(dir, 'sub'));
  const top = diffImage(join(dir, 'sub'), 'top.vhdx', mid.path, '..\\mid.vhdx', mid.expected, 52);
  return { base, mid, top };
}

async function compare(path: string, expected: Buffer, roots: string[]): Promise<void> {
  const img = await openImage({ filename: path, readOnly: true, allowedRoots: roots });
  try {
    const got = Buffer.alloc(img.node.length());
    await img.node.read(0, got);
    if (!got.equals(expected)) {
      let i = 0;
      while (got[i] === expected[i]) i++;
      assert.fail(`first difference at ${i} (block ${Math.floor(i / BLOCK)})`);
    }
    const rand = seededRandom(7);
    let mapped = 0;
    for (let i = 0; i < 2000; i++) {
      const len = 1 + Math.floor(rand() * (rand() < 0.5 ? 4 * K : 512 * K));
      const off = Math.floor(rand() * (SIZE - len));
      const b = Buffer.alloc(len);
      await img.node.read(off, b);
      assert.ok(b.equals(expected.subarray(off, off + len)), `read ${off}+${len}`);
      const viaMap = await readViaMap(img.node, off, len);
      if (viaMap) {
        mapped++;
        assert.ok(viaMap.equals(b), `mapped read ${off}+${len}`);
      }
    }
    assert.ok(mapped > 100, `ranges clear of partially present blocks map (${mapped})`);
  } finally {
    await img.close();
  }
}

describe('differencing vhdx chains', () => {
  const missing = missingTools('qemu-img', 'qemu-io');
  const skip = missing.length ? `missing: ${missing.join(', ')}` : false;

  test('a chain of three reads parent data, zero/unmapped blocks and partially present blocks right', {
    skip,
    timeout: 120_000,
  }, async (t) => {
    const dir = tempDir(t);
    const { mid, top } = chain(dir);
    await compare(mid.path, mid.expected, [dir]);
    await compare(top.path, top.expected, [dir]);
    // info: the parent as the locator names it (relative_path, '/' separators); the whole chain on request.
    const one = (await imageInfoJson(top.path, { allowedRoots: [dir] }))[0]!;
    assert.equal(one['backing-filename'], '../mid.vhdx');
    assert.equal(one['backing-filename-format'], 'vhdx');
    assert.equal(one['virtual-size'], SIZE);
    const all = await imageInfoJson(top.path, { backingChain: true, allowedRoots: [dir] });
    assert.deepEqual(
      all.map((x) => [x.format, x['backing-filename']]),
      [
        ['vhdx', '../mid.vhdx'],
        ['vhdx', './base.vhdx'],
        ['vhdx', undefined],
      ],
    );
    assert.equal(all[2]!.filename, join(dir, 'base.vhdx'));
  });

  test('a parent that changed (DataWriteGuid differs from parent_linkage) is refused', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t);
    const { base, mid } = chain(dir);
    applyWrites(dir, base, 'vhdx', [{ off: 0, len: 512, kind: 'data' }], 60); // QEMU sets a new DataWriteGuid
    await assert.rejects(
      openImage({ filename: mid.path, readOnly: true }),
      (e: Error & { code?: string; place?: { field?: string } }) => {
        assert.equal(e.code, 'BACKING_CHAIN');
        assert.equal(e.place?.field, 'metadata.parent_locator.parent_linkage');
        assert.match(e.message, /DataWriteGuid/);
        return true;
      },
    );
    // Without following the parent (qemu-img info's default), the image opens.
    const info = await imageInfoJson(mid.path);
    assert.equal(info[0]!['backing-filename'], './base.vhdx');
  });

  test('parent paths: outside the allowed roots refused, missing refused, Windows-only names refused', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t);
    const { top } = chain(dir);
    // top lives in dir/sub and names ../mid.vhdx: outside a root of dir/sub.
    await assert.rejects(
      openImage({ filename: top.path, readOnly: true, allowedRoots: [join(dir, 'sub')] }),
      {
        code: 'BACKING_POLICY',
      },
    );
    const lone = createVhdx(join(dir, 'lone.vhdx'), SIZE, { block_size: '1M' });
    makeDifferencing(lone, [
      ['parent_linkage', '{00000000-0000-0000-0000-000000000000}'],
      ['relative_path', '.\\nowhere.vhdx'],
    ]);
    await assert.rejects(openImage({ filename: lone, readOnly: true }), { code: 'BACKING_CHAIN' });
    const win = createVhdx(join(dir, 'win.vhdx'), SIZE, { block_size: '1M' });
    makeDifferencing(win, [
      ['parent_linkage', '{00000000-0000-0000-0000-000000000000}'],
      ['absolute_win32_path', 'D:\\vms\\p.vhdx'],
      ['volume_path', '\\\\?\\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\\p.vhdx'],
    ]);
    await assert.rejects(openImage({ filename: win, readOnly: true }), /names no path this host can open/);
  });
});
