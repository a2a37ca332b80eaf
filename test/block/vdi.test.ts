/**
 * The native vdi reader against QEMU: static and dynamic images (odd sizes
 * too) with sparse, random and zero content, read whole, by 2000 random
 * reads and through the fast path's host extents, equal `qemu-img convert
 * -O raw`; `info` equals `qemu-img info`; discarded blocks read as zeroes
 * (as QEMU reads them); hostile headers and block maps are refused with a
 * coded error naming the field, before anything is allocated from them.
 */
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import { BlkError } from '../../src/errors.js';
import { needTools, qemuImg, qemuIo, tempDir } from '../helpers/tools.js';
import { M } from './images.js';
import { CONTENTS, checkImage, coded, compareInfo, convertFrom, guest, qemuRaw } from './ro-formats.js';

const SIZES = [5 * M + 512 * 7, 4 * M];

describe('vdi read path against qemu-img', () => {
  test('static=on|off, sparse/random/zero content, equals qemu-img convert; info equals qemu-img info', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    let seed = 100;
    for (const opts of ['static=off', 'static=on']) {
      for (const content of CONTENTS) {
        const size = SIZES[seed % SIZES.length]!;
        const img = convertFrom(dir, `${opts}-${content}`, guest(content, size, seed), 'vdi', opts);
        await checkImage(img, 'vdi', qemuRaw(dir, img, 'vdi'), seed++);
        await compareInfo(img, 'vdi');
      }
    }
  });

  test('a discarded block (0xfffffffe) and a never-written one read as zeroes, as QEMU reads them', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = convertFrom(dir, 'd', guest('random', 4 * M, 7), 'vdi', 'static=off');
    const f = readFileSync(img);
    const bmap = f.readUInt32LE(0x154);
    f.writeUInt32LE(0xfffffffe, bmap + 4);
    f.writeUInt32LE(0xffffffff, bmap + 8);
    writeFileSync(img, f);
    const want = qemuRaw(dir, img, 'vdi');
    assert.ok(want.subarray(M, 3 * M).equals(Buffer.alloc(2 * M)));
    await checkImage(img, 'vdi', want, 8);
  });
});

describe('vdi under qcow2', () => {
  test('a qcow2 overlay whose backing file is a vdi reads as qemu-img reads it', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    convertFrom(dir, 'base', guest('random', 4 * M, 9), 'vdi', 'static=off');
    const top = join(dir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.vdi', '-F', 'vdi', top);
    qemuIo('-f', 'qcow2', '-c', 'write -P 9 100000 300000', '-c', 'write -z 2000000 70000', top);
    await checkImage(top, 'qcow2', qemuRaw(dir, top, 'qcow2'), 10);
  });
});

describe('hostile vdi images', () => {
  test('mutated headers and block maps are refused with a coded error naming the field', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const src = convertFrom(dir, 'src', guest('sparse', 4 * M, 1), 'vdi', 'static=off');
    const bmap = readFileSync(src).readUInt32LE(0x154);
    const mutants: [string, (f: Buffer) => void, string, string][] = [
      ['signature', (f) => f.writeUInt32LE(0xbeda1070, 0x40), 'IMAGE_INVALID', 'signature'],
      ['version', (f) => f.writeUInt32LE(0x00010000, 0x44), 'IMAGE_UNSUPPORTED', 'version'],
      ['image type', (f) => f.writeUInt32LE(4, 0x4c), 'IMAGE_UNSUPPORTED', 'image_type'],
      ['unaligned bmap', (f) => f.writeUInt32LE(0x201, 0x154), 'IMAGE_UNSUPPORTED', 'offset_bmap'],
      ['sector size', (f) => f.writeUInt32LE(4096, 0x168), 'IMAGE_UNSUPPORTED', 'sector_size'],
      ['block size', (f) => f.writeUInt32LE(2 * M, 0x178), 'IMAGE_UNSUPPORTED', 'block_size'],
      ['block extra', (f) => f.writeUInt32LE(512, 0x17c), 'IMAGE_UNSUPPORTED', 'block_extra'],
      ['disk size', (f) => f.writeBigUInt64LE(1n << 40n, 0x170), 'IMAGE_CORRUPT', 'disk_size'],
      ['parent uuid', (f) => f.writeUInt8(1, 0x1b8), 'IMAGE_UNSUPPORTED', 'uuid_parent'],
      ['link uuid', (f) => f.writeUInt8(1, 0x1a8), 'IMAGE_UNSUPPORTED', 'uuid_link'],
      // 2^30-1 blocks (a 4 GiB map) in a tiny file: refused before the map is read.
      [
        'huge map',
        (f) => {
          f.writeUInt32LE(0x3fffffff, 0x180);
          f.writeBigUInt64LE(1n << 49n, 0x170);
        },
        'IMAGE_CORRUPT',
        'offset_bmap',
      ],
      ['too many blocks', (f) => f.writeUInt32LE(0x40000000, 0x180), 'IMAGE_UNSUPPORTED', 'blocks_in_image'],
      // A 20 TiB disk whose 80 MiB map lies in a sparse file: refused before the map is read.
      [
        'map too long',
        (f) => {
          f.writeUInt32LE(20 << 20, 0x180);
          f.writeBigUInt64LE(20n << 40n, 0x170);
          f.writeUInt32LE(0x200 + 80 * 1024 * 1024, 0x158);
        },
        'IMAGE_UNSUPPORTED',
        'disk_size',
      ],
      ['map entry', (f) => f.writeUInt32LE(4000, bmap + 4), 'IMAGE_CORRUPT', 'block_map[1]'],
    ];
    for (const [name, mutate, code, field] of mutants) {
      const f = Buffer.from(readFileSync(src));
      mutate(f);
      const img = join(dir, `m-${name.replace(/ /g, '-')}.vdi`);
      writeFileSync(img, f);
      if (name === 'map too long') truncateSync(img, 0x200 + 80 * 1024 * 1024 + 4096);
      const before = process.memoryUsage().rss;
      await assert.rejects(
        openImage({ filename: img, format: 'vdi', readOnly: true }),
        coded(name, code, field, img),
      );
      assert.ok(process.memoryUsage().rss - before < 256 * M, `${name}: memory bounded`);
    }
    await assert.rejects(openImage({ filename: src, format: 'vdi', readOnly: false }), (e) => {
      assert.ok(e instanceof BlkError && e.code === 'NOT_SUPPORTED' && /vdi/.test(e.message), String(e));
      return true;
    });
  });
});
