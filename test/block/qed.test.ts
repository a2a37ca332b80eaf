/**
 * The native qed reader against QEMU: cluster_size and table_size choices
 * with sparse, random and zero content, zero clusters over data and over a
 * backing file, a raw backing file shorter than the image, and an image with
 * the need-check bit set: read whole, by 2000 random reads and through the
 * fast path's host extents, equal `qemu-img convert -O raw`; `info` equals
 * `qemu-img info`. A backing file of unrecorded format is refused (never
 * probed); hostile headers and tables are refused with a coded error naming
 * the field.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import { BlkError } from '../../src/errors.js';
import { needTools, qemuImg, tempDir } from '../helpers/tools.js';
import { applyWrites, K, M, scatteredWrites, type Write } from './images.js';
import { CONTENTS, checkImage, coded, compareInfo, convertFrom, guest, qemuRaw } from './ro-formats.js';

const OPTIONS = [
  'cluster_size=4096,table_size=2',
  'cluster_size=4096,table_size=16',
  'cluster_size=65536,table_size=4',
  'cluster_size=1048576,table_size=2',
];

/** Data writes, then zero writes over some of them (QED writes zero clusters for those). */
function writesWithZeroes(seed: number, size: number, cluster: number): Write[] {
  const data = scatteredWrites(seed, size, cluster, 64 * cluster, 10);
  const zero = scatteredWrites(seed + 1, size, cluster, 64 * cluster, 6).map((w) => ({
    off: Math.floor(w.off / cluster) * cluster,
    len: Math.max(cluster, Math.floor(w.len / cluster) * cluster),
    kind: 'zero' as const,
  }));
  return [...data, ...zero.filter((w) => w.off + w.len <= size)];
}

describe('qed read path against qemu-img', () => {
  test('cluster_size x table_size, sparse/random/zero content, equals qemu-img convert; info equals qemu-img info', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    let seed = 200;
    for (const opts of OPTIONS) {
      for (const content of CONTENTS) {
        const size = 5 * M + (seed % 3) * 512 * 3;
        const img = convertFrom(
          dir,
          `${opts.replace(/[=,]/g, '_')}-${content}`,
          guest(content, size, seed),
          'qed',
          opts,
        );
        await checkImage(img, 'qed', qemuRaw(dir, img, 'qed'), seed++);
        await compareInfo(img, 'qed');
      }
    }
  });

  test('zero clusters over data and over a raw backing file shorter than the image', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const base = join(dir, 'base.raw');
    writeFileSync(base, guest('random', 3 * M + 4 * K, 31));
    for (const cluster of [4096, 65536]) {
      const plain = join(dir, `plain-${cluster}.qed`);
      qemuImg('create', '-q', '-f', 'qed', '-o', `cluster_size=${cluster}`, plain, String(6 * M));
      applyWrites(dir, plain, 'qed', writesWithZeroes(cluster, 6 * M, cluster), cluster);
      await checkImage(plain, 'qed', qemuRaw(dir, plain, 'qed'), cluster);

      const top = join(dir, `top-${cluster}.qed`);
      qemuImg(
        'create',
        '-q',
        '-f',
        'qed',
        '-o',
        `cluster_size=${cluster}`,
        '-b',
        'base.raw',
        '-F',
        'raw',
        top,
        String(5 * M),
      );
      applyWrites(dir, top, 'qed', writesWithZeroes(cluster + 1, 5 * M, cluster), cluster + 1);
      const want = qemuRaw(dir, top, 'qed');
      await checkImage(top, 'qed', want, cluster + 2);
      await compareInfo(top, 'qed');
      // Without the backing file (info's view) the backing's bytes are zeroes.
      const alone = await openImage({ filename: top, format: 'qed', readOnly: true, backing: 'none' });
      try {
        assert.equal(alone.node.children.length, 1);
      } finally {
        await alone.close();
      }
    }
  });

  test('the need-check bit: opened unchecked and untouched, read and described as QEMU does', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = convertFrom(dir, 'dirty', guest('sparse', 4 * M, 41), 'qed', '');
    const f = readFileSync(img);
    f.writeBigUInt64LE(f.readBigUInt64LE(16) | 2n, 16);
    writeFileSync(img, f);
    await compareInfo(img, 'qed');
    await checkImage(img, 'qed', qemuRaw(dir, img, 'qed'), 42);
    assert.ok(readFileSync(img).equals(f), 'the image is not touched');
  });

  test('table_size=1 (which QEMU 7.2 cannot open) reads as zeroes', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = join(dir, 't1.qed');
    qemuImg('create', '-q', '-f', 'qed', '-o', 'cluster_size=65536,table_size=1', img, String(3 * M));
    await checkImage(img, 'qed', Buffer.alloc(3 * M), 51);
  });

  test('a backing file of unrecorded format is refused (never probed); info still describes the image', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), String(2 * M));
    const img = join(dir, 'top.qed');
    qemuImg('create', '-q', '-f', 'qed', '-b', 'base.qcow2', '-F', 'qcow2', img);
    await assert.rejects(openImage({ filename: img, format: 'qed', readOnly: true }), (e) => {
      assert.ok(
        e instanceof BlkError && e.code === 'BACKING_POLICY' && e.place.field === 'features',
        String(e),
      );
      return true;
    });
    await compareInfo(img, 'qed');
  });
});

describe('hostile qed images', () => {
  test('mutated headers and tables are refused with a coded error naming the field', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const src = convertFrom(dir, 'src', guest('random', 2 * M, 1), 'qed', 'cluster_size=4096,table_size=2');
    const clean = readFileSync(src);
    const l1 = Number(clean.readBigUInt64LE(40));
    const l2 = Number(clean.readBigUInt64LE(l1));
    const atOpen: [string, (f: Buffer) => void, string, string][] = [
      ['magic', (f) => f.write('QEE', 0, 'latin1'), 'IMAGE_INVALID', 'magic'],
      ['cluster size', (f) => f.writeUInt32LE(1000, 4), 'IMAGE_INVALID', 'cluster_size'],
      ['table size', (f) => f.writeUInt32LE(3, 8), 'IMAGE_INVALID', 'table_size'],
      ['header size', (f) => f.writeUInt32LE(0xffffffff, 12), 'IMAGE_CORRUPT', 'header_size'],
      ['features', (f) => f.writeBigUInt64LE(0x100n, 16), 'IMAGE_UNSUPPORTED', 'features'],
      ['image size', (f) => f.writeBigUInt64LE(1n << 62n, 48), 'IMAGE_INVALID', 'image_size'],
      ['odd image size', (f) => f.writeBigUInt64LE(12345n, 48), 'IMAGE_INVALID', 'image_size'],
      [
        'L1 past the end',
        (f) => f.writeBigUInt64LE(BigInt(f.length), 40),
        'IMAGE_CORRUPT',
        'l1_table_offset',
      ],
      ['L1 in the header', (f) => f.writeBigUInt64LE(0n, 40), 'IMAGE_CORRUPT', 'l1_table_offset'],
      ['L1 unaligned', (f) => f.writeBigUInt64LE(BigInt(l1 + 8), 40), 'IMAGE_CORRUPT', 'l1_table_offset'],
      [
        'backing name',
        (f) => {
          f.writeBigUInt64LE(1n, 16);
          f.writeUInt32LE(4000, 56);
          f.writeUInt32LE(200, 60);
        },
        'IMAGE_CORRUPT',
        'backing_filename_offset',
      ],
    ];
    const atRead: [string, (f: Buffer) => void, string][] = [
      ['L1 entry', (f) => f.writeBigUInt64LE(BigInt(f.length + 4096), l1), 'l1_table[0]'],
      ['L1 entry unaligned', (f) => f.writeBigUInt64LE(BigInt(l2 + 8), l1), 'l1_table[0]'],
      ['L2 entry', (f) => f.writeBigUInt64LE(1n << 52n, l2 + 8), 'l2_table'],
      ['L2 entry in the header', (f) => f.writeBigUInt64LE(2n, l2), 'l2_table'],
    ];
    const mutant = (name: string, mutate: (f: Buffer) => void) => {
      const f = Buffer.from(clean);
      mutate(f);
      const img = join(dir, `m-${name.replace(/ /g, '-')}.qed`);
      writeFileSync(img, f);
      return img;
    };
    for (const [name, mutate, code, field] of atOpen) {
      const img = mutant(name, mutate);
      await assert.rejects(
        openImage({ filename: img, format: 'qed', readOnly: true }),
        coded(name, code, field, img),
      );
    }
    for (const [name, mutate, field] of atRead) {
      const img = mutant(name, mutate);
      const opened = await openImage({ filename: img, format: 'qed', readOnly: true });
      try {
        assert.equal(
          opened.node.mapHostCached?.(0, 8192),
          null,
          `${name}: the fast path leaves it to the read`,
        );
        await assert.rejects(
          opened.node.read(0, Buffer.alloc(8192)),
          coded(name, 'IMAGE_CORRUPT', field, img),
        );
      } finally {
        await opened.close();
      }
    }
    await assert.rejects(openImage({ filename: src, format: 'qed', readOnly: false }), (e) => {
      assert.ok(e instanceof BlkError && e.code === 'NOT_SUPPORTED' && /qed/.test(e.message), String(e));
      return true;
    });
  });
});
