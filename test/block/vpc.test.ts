/**
 * The native vpc (vhd) reader against QEMU: every subformat and option
 * qemu-img offers (fixed, dynamic, force_size) with sparse, random and zero
 * content, read whole, by 2000 random reads and through the fast path's
 * host extents, equal `qemu-img convert -O raw`, and `info` equals
 * `qemu-img info`. A hand-made differencing chain of three (parent locators
 * W2ru and MacX, sector bitmaps with holes) reads as its layers composed.
 * Hostile footers, headers and tables are refused with a coded error naming
 * the field.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import { BlkError } from '../../src/errors.js';
import { needTools, tempDir } from '../helpers/tools.js';
import { M } from './images.js';
import { CONTENTS, checkImage, coded, compareInfo, convertFrom, guest, qemuRaw } from './ro-formats.js';

const OPTIONS = [
  'subformat=dynamic',
  'subformat=fixed',
  'subformat=dynamic,force_size=on',
  'subformat=fixed,force_size=on',
];
/** Sizes CHS geometry cannot say exactly (so force_size matters), and one it can. */
const SIZES = [5_000_000, 6 * M + 12_345, 8 * M];

describe('vpc read path against qemu-img', () => {
  test('every subformat and force_size, sparse/random/zero content, equals qemu-img convert; info equals qemu-img info', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    let seed = 1;
    for (const opts of OPTIONS) {
      for (const content of CONTENTS) {
        const size = SIZES[seed % SIZES.length]!;
        const name = `${opts.replace(/[=,]/g, '_')}-${content}-${size}`;
        const img = convertFrom(dir, name, guest(content, size, seed), 'vpc', opts);
        await checkImage(img, 'vpc', qemuRaw(dir, img, 'vpc'), seed++);
        await compareInfo(img, 'vpc');
      }
    }
  });
});

describe('vpc virtual size: CHS or current_size, by creator application', () => {
  test('each creator application QEMU knows (and some it does not) gets the size qemu-img reports', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const apps = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0', 'vpc ', 'qemu', 'wa\0\0', 'tap ', 'xyz1'];
    let seed = 300;
    for (const subformat of ['dynamic', 'fixed']) {
      const src = convertFrom(
        dir,
        `apps-${subformat}`,
        guest('random', 5_000_000, seed),
        'vpc',
        `subformat=${subformat}`,
      );
      for (const app of apps) {
        const f = readFileSync(src);
        const at = subformat === 'dynamic' ? 0 : f.length - 512;
        f.write(app, at + 0x1c, 'latin1');
        // current_size a little under the CHS size, so the two rules differ.
        f.writeBigUInt64BE(4_999_680n, at + 0x30);
        f.writeUInt32BE(checksum(f.subarray(at, at + 512), 0x40), at + 0x40);
        const img = join(dir, `app-${subformat}-${app.replace(/\0/g, '0').trim()}.vpc`);
        writeFileSync(img, f);
        await compareInfo(img, 'vpc');
        await checkImage(img, 'vpc', qemuRaw(dir, img, 'vpc'), seed++);
      }
    }
  });
});

// --- differencing disks, made by hand from qemu-img's dynamic ones ---------------------------

function checksum(b: Buffer, at: number): number {
  let sum = 0;
  for (let i = 0; i < b.length; i++) if (i < at || i >= at + 4) sum += b[i]!;
  return ~sum >>> 0;
}

function utf16be(s: string): Buffer {
  const le = Buffer.from(s, 'utf16le');
  for (let i = 0; i < le.length; i += 2) [le[i], le[i + 1]] = [le[i + 1]!, le[i]!];
  return le;
}

interface Locator {
  platform: 'W2ru' | 'W2ku' | 'MacX';
  data: Buffer;
}

/**
 * Turns the qemu-img-made dynamic vhd at `img` into a differencing disk of
 * `parent` (footer type 4, parent UUID and name, locators appended in front
 * of the trailing footer); clears the bitmap bits `holes(block)` lists.
 */
function makeDifferencing(
  img: string,
  parent: string,
  locators: Locator[],
  holes: (block: number) => number[],
): void {
  let f = readFileSync(img);
  const footer = Buffer.from(f.subarray(0, 512));
  footer.writeUInt32BE(4, 0x3c);
  footer.writeUInt32BE(checksum(footer, 0x40), 0x40);
  const dynAt = Number(footer.readBigUInt64BE(0x10));
  const dyn = Buffer.from(f.subarray(dynAt, dynAt + 1024));
  readFileSync(parent).copy(dyn, 0x28, 0x44, 0x54); // parent UUID = the parent's footer UUID
  dyn.fill(0, 0x40, 0x240);
  utf16be(basename(parent)).copy(dyn, 0x40);
  let tail = f.length - 512;
  const blobs: Buffer[] = [];
  locators.forEach((l, i) => {
    const at = 0x240 + i * 24;
    const space = Math.ceil(l.data.length / 512) * 512;
    dyn.write(l.platform, at, 'latin1');
    dyn.writeUInt32BE(space / 512, at + 4);
    dyn.writeUInt32BE(l.data.length, at + 8);
    dyn.writeBigUInt64BE(BigInt(tail), at + 16);
    const blob = Buffer.alloc(space);
    l.data.copy(blob);
    blobs.push(blob);
    tail += space;
  });
  dyn.writeUInt32BE(checksum(dyn, 0x24), 0x24);
  footer.copy(f, 0);
  dyn.copy(f, dynAt);
  const blockSize = dyn.readUInt32BE(0x20);
  const bat = Number(dyn.readBigUInt64BE(0x10));
  const entries = dyn.readUInt32BE(0x1c);
  for (let b = 0; b < entries; b++) {
    const e = f.readUInt32BE(bat + 4 * b);
    if (e === 0xffffffff) continue;
    for (const s of holes(b)) f[e * 512 + (s >> 3)]! &= ~(0x80 >> (s & 7));
  }
  void blockSize;
  f = Buffer.concat([f.subarray(0, f.length - 512), ...blobs, footer]);
  writeFileSync(img, f);
}

/** What a differencing disk holds: its own sectors (bitmap bit set in an allocated block), the parent's elsewhere. */
function compose(img: string, own: Buffer, parent: Buffer): Buffer {
  const f = readFileSync(img);
  const dynAt = Number(f.readBigUInt64BE(0x10));
  const blockSize = f.readUInt32BE(dynAt + 0x20);
  const bat = Number(f.readBigUInt64BE(dynAt + 0x10));
  const out = Buffer.from(parent);
  for (let s = 0; s < own.length / 512; s++) {
    const b = Math.floor((s * 512) / blockSize);
    const e = f.readUInt32BE(bat + 4 * b);
    if (e === 0xffffffff) continue;
    const i = s - (b * blockSize) / 512;
    if (f[e * 512 + (i >> 3)]! & (0x80 >> (i & 7))) own.copy(out, s * 512, s * 512, s * 512 + 512);
  }
  return out;
}

describe('differencing vhd', () => {
  test('a chain of three (W2ru and MacX locators, bitmaps with holes) reads as its layers composed', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const size = 7 * M;
    const base = convertFrom(dir, 'base', guest('random', size, 11), 'vpc', 'subformat=dynamic');
    const baseWant = qemuRaw(dir, base, 'vpc');
    const mid = convertFrom(dir, 'mid', guest('sparse', size, 12), 'vpc', 'subformat=dynamic');
    const midOwn = qemuRaw(dir, mid, 'vpc');
    makeDifferencing(mid, base, [{ platform: 'W2ru', data: Buffer.from('.\\base.vpc', 'utf16le') }], (b) =>
      b === 0 ? [0, 1, 2, 100, 101, 4095] : [7, 8, 9, 10, 2000],
    );
    const midWant = compose(mid, midOwn, baseWant);
    const top = convertFrom(dir, 'top', guest('sparse', size, 13), 'vpc', 'subformat=dynamic');
    const topOwn = qemuRaw(dir, top, 'vpc');
    makeDifferencing(
      top,
      mid,
      [
        { platform: 'W2ku', data: Buffer.from('C:\\vms\\mid.vpc', 'utf16le') },
        { platform: 'MacX', data: Buffer.from(`file://${encodeURI(mid)}`) },
      ],
      (b) => [3, 4, 5, 6, 64 * b + 1, 4000],
    );
    const topWant = compose(top, topOwn, midWant);
    assert.ok(!topWant.equals(topOwn), 'the parents show through');
    await checkImage(mid, 'vpc', midWant, 21);
    await checkImage(top, 'vpc', topWant, 22);

    const opened = await openImage({ filename: top, format: 'vpc', readOnly: true });
    try {
      const info = opened.node.imageInfo!();
      assert.equal(info.backingFormat, 'vpc');
      assert.equal(opened.node.children[1]?.driver, 'vpc');
      assert.equal(opened.node.children[1]?.children[1]?.filename, base);
    } finally {
      await opened.close();
    }
    // Without its parent (backing: none, as `info` opens it) the parent's sectors read as zeroes.
    const alone = await openImage({ filename: top, format: 'vpc', readOnly: true, backing: 'none' });
    try {
      const b = Buffer.alloc(512);
      await alone.node.read(3 * 512, b);
      assert.ok(b.equals(Buffer.alloc(512)));
    } finally {
      await alone.close();
    }
  });

  test('a parent that is missing, outside the roots or another disk is refused', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const other = tempDir(t);
    const size = 3 * M;
    const base = convertFrom(dir, 'base', guest('random', size, 1), 'vpc', 'subformat=dynamic');
    const stranger = convertFrom(dir, 'stranger', guest('random', size, 2), 'vpc', 'subformat=dynamic');
    const away = convertFrom(other, 'away', guest('random', size, 3), 'vpc', 'subformat=dynamic');
    const cases: [string, string, Locator[], string, string][] = [
      [
        'missing',
        base,
        [{ platform: 'W2ru', data: Buffer.from('.\\nope.vpc', 'utf16le') }],
        'BACKING_CHAIN',
        'parent_locator',
      ],
      [
        'outside',
        away,
        [{ platform: 'MacX', data: Buffer.from(`file://${away}`) }],
        'BACKING_POLICY',
        'parent_locator',
      ],
      [
        'uuid',
        base,
        [{ platform: 'W2ru', data: Buffer.from('stranger.vpc', 'utf16le') }],
        'BACKING_CHAIN',
        'parent_uuid',
      ],
    ];
    void stranger;
    for (const [name, parent, locs, code, field] of cases) {
      const img = convertFrom(dir, name, guest('sparse', size, 4), 'vpc', 'subformat=dynamic');
      makeDifferencing(img, parent, locs, () => []);
      // The header's own parent name must not rescue the case: point it nowhere.
      const f = readFileSync(img);
      const dynAt = Number(f.readBigUInt64BE(0x10));
      f.fill(0, dynAt + 0x40, dynAt + 0x240);
      f.writeUInt32BE(checksum(f.subarray(dynAt, dynAt + 1024), 0x24), dynAt + 0x24);
      writeFileSync(img, f);
      await assert.rejects(openImage({ filename: img, format: 'vpc', readOnly: true }), (e) => {
        assert.ok(e instanceof BlkError, String(e));
        assert.equal(e.code, code, `${name}: ${e.message}`);
        assert.equal(e.place.field, field, `${name}: ${e.message}`);
        return true;
      });
    }
  });
});

// --- hostile images -------------------------------------------------------------------------

describe('hostile vpc images', () => {
  test('mutated footers, headers and BATs are refused with a coded error naming the field', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const dyn = convertFrom(dir, 'dyn', guest('sparse', 5 * M, 1), 'vpc', 'subformat=dynamic');
    const fixed = convertFrom(dir, 'fixed', guest('sparse', 5 * M, 1), 'vpc', 'subformat=fixed');
    const clean = readFileSync(dyn);
    const dynAt = Number(clean.readBigUInt64BE(0x10));
    const batAt = Number(clean.readBigUInt64BE(dynAt + 0x10));
    const fixFooter = (f: Buffer, at: number) =>
      f.writeUInt32BE(checksum(f.subarray(at, at + 512), 0x40), at + 0x40);
    const fixDyn = (f: Buffer) =>
      f.writeUInt32BE(checksum(f.subarray(dynAt, dynAt + 1024), 0x24), dynAt + 0x24);
    const mutants: [string, string, (f: Buffer) => void, string, string][] = [
      ['checksum', dyn, (f) => f.writeUInt8(f[0x30]! ^ 1, 0x30), 'IMAGE_CORRUPT', 'checksum'],
      [
        'fixed checksum',
        fixed,
        (f) => f.writeUInt8(f[f.length - 512 + 0x38]! ^ 1, f.length - 512 + 0x38),
        'IMAGE_CORRUPT',
        'checksum',
      ],
      [
        'huge geometry',
        fixed,
        (f) => {
          f.write('win ', f.length - 512 + 0x1c, 'latin1');
          f.writeBigUInt64BE(1n << 60n, f.length - 512 + 0x30);
          fixFooter(f, f.length - 512);
        },
        'IMAGE_TOO_LARGE',
        'current_size',
      ],
      [
        'fixed past its data',
        fixed,
        (f) => {
          f.write('win ', f.length - 512 + 0x1c, 'latin1');
          f.writeBigUInt64BE(BigInt(f.length), f.length - 512 + 0x30);
          fixFooter(f, f.length - 512);
        },
        'IMAGE_CORRUPT',
        'current_size',
      ],
      [
        'fixed type at 0',
        dyn,
        (f) => {
          f.writeUInt32BE(2, 0x3c);
          fixFooter(f, 0);
        },
        'IMAGE_CORRUPT',
        'disk_type',
      ],
      [
        'data_offset',
        dyn,
        (f) => {
          f.writeBigUInt64BE(1n << 50n, 0x10);
          fixFooter(f, 0);
        },
        'IMAGE_CORRUPT',
        'data_offset',
      ],
      [
        'dyn checksum',
        dyn,
        (f) => f.writeUInt8(f[dynAt + 0x1c]! ^ 1, dynAt + 0x1c),
        'IMAGE_CORRUPT',
        'dyn_header.checksum',
      ],
      [
        'block_size',
        dyn,
        (f) => {
          f.writeUInt32BE(3000, dynAt + 0x20);
          fixDyn(f);
        },
        'IMAGE_CORRUPT',
        'block_size',
      ],
      [
        'max_table_entries',
        dyn,
        (f) => {
          f.writeUInt32BE(1, dynAt + 0x1c);
          fixDyn(f);
        },
        'IMAGE_CORRUPT',
        'max_table_entries',
      ],
      [
        'table_offset',
        dyn,
        (f) => {
          f.writeBigUInt64BE(BigInt(f.length - 4), dynAt + 0x10);
          fixDyn(f);
        },
        'IMAGE_CORRUPT',
        'table_offset',
      ],
      ['BAT entry', dyn, (f) => f.writeUInt32BE(0x7fffffff, batAt), 'IMAGE_CORRUPT', 'bat[0]'],
      [
        'tiny blocks',
        dyn,
        (f) => {
          f.write('win ', 0x1c, 'latin1');
          f.writeBigUInt64BE(16n << 30n, 0x30);
          fixFooter(f, 0);
          f.writeUInt32BE(512, dynAt + 0x20);
          f.writeUInt32BE(0xffffffff, dynAt + 0x1c);
          fixDyn(f);
        },
        'IMAGE_UNSUPPORTED',
        'block_size',
      ],
      [
        'locator length',
        dyn,
        (f) => {
          f.writeUInt32BE(4, 0x3c);
          fixFooter(f, 0);
          f.write('W2ru', dynAt + 0x240, 'latin1');
          f.writeUInt32BE(0x7fffffff, dynAt + 0x248);
          fixDyn(f);
        },
        'IMAGE_CORRUPT',
        'parent_locator[0].data_length',
      ],
    ];
    for (const [name, src, mutate, code, field] of mutants) {
      const f = Buffer.from(readFileSync(src));
      mutate(f);
      const img = join(dir, `m-${name.replace(/ /g, '-')}.vpc`);
      writeFileSync(img, f);
      await assert.rejects(
        openImage({ filename: img, format: 'vpc', readOnly: true }),
        coded(name, code, field, img),
      );
    }
    // A writable open names the format.
    await assert.rejects(openImage({ filename: dyn, format: 'vpc', readOnly: false }), (e) => {
      assert.ok(e instanceof BlkError && e.code === 'NOT_SUPPORTED' && /vpc/.test(e.message), String(e));
      return true;
    });
  });
});
