/**
 * Hostile vhdx images: hand-mutated copies of a qemu-img-made image. A bad
 * copy of a checksummed structure (header, region table) falls back to the
 * other copy; anything else wrong is refused at open (or, for an invalid
 * block state, at the read that reaches it) with a coded error naming the
 * image and the field, quickly and without allocating what a header claims.
 */
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/index.js';
import { missingTools, tempDir } from '../helpers/tools.js';
import { applyWrites, convertToRaw } from './images.js';
import {
  batEntry,
  createVhdx,
  currentHeaderOffset,
  K,
  M,
  readAt,
  regions,
  resealHeader,
  resealRegionTable,
  setBatEntry,
  writeAt,
} from './vhdx-images.js';

const SIZE = 16 * M;

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v);
  return b;
}
function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
}

/** Opens the image and reads it whole; the bytes. */
async function readAll(path: string, format: 'auto' | 'vhdx' = 'auto'): Promise<Buffer> {
  const img = await openImage({ filename: path, readOnly: true, format });
  try {
    const b = Buffer.alloc(img.node.length());
    await img.node.read(0, b);
    return b;
  } finally {
    await img.close();
  }
}

async function refused(path: string, code: string, field: RegExp | string): Promise<void> {
  const t0 = Date.now();
  await assert.rejects(
    readAll(path, 'vhdx'),
    (e: Error & { code?: string; place?: { file?: string; field?: string } }) => {
      assert.equal(e.code, code, e.message);
      if (typeof field === 'string') assert.equal(e.place?.field, field, e.message);
      else assert.match(e.place?.field ?? '', field, e.message);
      assert.equal(e.place?.file, path);
      return true;
    },
  );
  assert.ok(Date.now() - t0 < 5000, 'refused quickly');
}

describe('hostile vhdx images', () => {
  const missing = missingTools('qemu-img', 'qemu-io');
  const skip = missing.length ? `missing: ${missing.join(', ')}` : false;
  let n = 0;
  const built = new Set<string>();
  /** A fresh copy of a 16 MiB image (1 MiB blocks) with data in blocks 0, 5 and 15, and its raw bytes. */
  function fixture(dir: string): { path: string; raw: Buffer } {
    const src = join(dir, 'src.vhdx');
    if (!built.has(dir)) {
      built.add(dir);
      createVhdx(src, SIZE, { block_size: '1M' });
      applyWrites(
        dir,
        src,
        'vhdx',
        [
          { off: 1000, len: 70 * K, kind: 'data' },
          { off: 5 * M + 3, len: 200 * K, kind: 'data' },
          { off: SIZE - 100 * K, len: 100 * K, kind: 'data' },
        ],
        90,
      );
      convertToRaw(src, join(dir, 'src.raw'));
    }
    n++;
    const path = join(dir, `m${n}.vhdx`);
    copyFileSync(src, path);
    return { path, raw: readFileSync(join(dir, 'src.raw')) };
  }

  test('headers: one bad copy falls back to the other; both bad, or equal numbers with different contents, refused', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t);
    for (const off of [64 * K, 128 * K]) {
      const { path, raw } = fixture(dir);
      writeAt(path, off + 200, Buffer.from('garbage')); // inside the checksummed 4 KiB
      assert.ok((await readAll(path)).equals(raw), `header at ${off} corrupt`);
    }
    const { path: both } = fixture(dir);
    writeAt(both, 64 * K + 4, u32(1));
    writeAt(both, 128 * K + 4, u32(1));
    await refused(both, 'IMAGE_CORRUPT', 'header');
    const { path: same } = fixture(dir);
    const cur = currentHeaderOffset(same);
    const other = cur === 64 * K ? 128 * K : 64 * K;
    writeAt(same, other + 8, readAt(same, cur + 8, 8));
    writeAt(same, other + 16, Buffer.from('different file write guid'.slice(0, 16)));
    resealHeader(same, other);
    await refused(same, 'IMAGE_CORRUPT', 'header.sequence_number');
    const { path: logv } = fixture(dir);
    writeAt(logv, currentHeaderOffset(logv) + 64, Buffer.from([1, 0]));
    resealHeader(logv, currentHeaderOffset(logv));
    await refused(logv, 'IMAGE_UNSUPPORTED', 'header.log_version');
    const { path: nosig } = fixture(dir);
    writeAt(nosig, 0, Buffer.from('vhdxfilX'));
    await refused(nosig, 'IMAGE_INVALID', 'file_identifier'); // probing would call it raw
  });

  test('region table: a bad first copy uses the second; both bad, past the end of the file, overlapping, too many entries refused', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t);
    const { path: first, raw } = fixture(dir);
    writeAt(first, 192 * K + 1000, Buffer.from('x'));
    assert.ok((await readAll(first)).equals(raw));
    const { path: both } = fixture(dir);
    writeAt(both, 192 * K + 1000, Buffer.from('x'));
    writeAt(both, 256 * K + 1000, Buffer.from('x'));
    await refused(both, 'IMAGE_CORRUPT', 'region_table');
    // Entry 0 is the BAT (QEMU writes it first): move it past the end of the file, then onto the log.
    for (const [offset, why] of [
      [1n << 40n, 'past the end'],
      [1n * BigInt(M), 'overlaps'],
    ] as const) {
      const { path } = fixture(dir);
      for (const t0 of [192 * K, 256 * K]) {
        writeAt(path, t0 + 16 + 16, u64(offset));
        resealRegionTable(path, t0);
      }
      await assert.rejects(readAll(path), new RegExp(why));
      await refused(path, 'IMAGE_CORRUPT', 'region_table.entry[0]');
    }
    const { path: many } = fixture(dir);
    writeAt(many, 192 * K + 8, u32(100000));
    resealRegionTable(many, 192 * K);
    await refused(many, 'IMAGE_CORRUPT', 'region_table.entry_count');
  });

  test('BAT entries past the end of the file, in the header section, over metadata, or in a reserved state', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t);
    const { path: past } = fixture(dir);
    setBatEntry(past, 5, 6, 1024 * M);
    await assert.rejects(readAll(past), /points past the end of the file/);
    await refused(past, 'IMAGE_CORRUPT', 'bat[5]');
    const { path: head } = fixture(dir);
    setBatEntry(head, 5, 6, 0);
    await refused(head, 'IMAGE_CORRUPT', 'bat[5]');
    const { path: meta } = fixture(dir);
    setBatEntry(meta, 7, 6, regions(meta).meta);
    await assert.rejects(readAll(meta), /overlaps/);
    const { path: huge } = fixture(dir);
    const b = Buffer.alloc(8, 0xff);
    writeAt(huge, regions(huge).bat + 8 * 9, b);
    await refused(huge, 'IMAGE_CORRUPT', 'bat[9]');
    // A reserved state opens (QEMU opens it too) and fails the read that reaches it, not others.
    const { path: reserved, raw } = fixture(dir);
    setBatEntry(reserved, 5, 4, batEntry(reserved, 5)[1]);
    const img = await openImage({ filename: reserved, readOnly: true });
    try {
      const ok = Buffer.alloc(M);
      await img.node.read(0, ok);
      assert.ok(ok.equals(raw.subarray(0, M)));
      await assert.rejects(img.node.read(5 * M, Buffer.alloc(10)), {
        code: 'IMAGE_CORRUPT',
        place: { file: reserved, field: 'bat[5]' },
      });
      assert.equal(img.node.mapHostCached?.(5 * M, 10), null);
    } finally {
      await img.close();
    }
  });

  test('metadata: bad block size, sector size, sizes the BAT cannot hold, unknown required items', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t);
    // QEMU's items at 64 KiB into the region: file parameters, virtual size, page 83, logical, physical sector size.
    const item = (path: string, rel: number) => regions(path).meta + 64 * K + rel;
    const { path: bs } = fixture(dir);
    writeAt(bs, item(bs, 0), u32(3 * M));
    await refused(bs, 'IMAGE_CORRUPT', 'metadata.file_parameters.block_size');
    const { path: lss } = fixture(dir);
    writeAt(lss, item(lss, 32), u32(1024));
    await refused(lss, 'IMAGE_CORRUPT', 'metadata.logical_sector_size');
    const { path: big } = fixture(dir);
    writeAt(big, item(big, 8), u64(1n << 60n));
    await refused(big, 'IMAGE_TOO_LARGE', 'metadata.virtual_disk_size');
    // 8 TiB of 1 MiB blocks needs 64 MiB of BAT; the region has 1 MiB: refused before any allocation.
    const { path: bat } = fixture(dir);
    writeAt(bat, item(bat, 8), u64(8n << 40n));
    const heap = process.memoryUsage().arrayBuffers;
    await refused(bat, 'IMAGE_CORRUPT', 'bat');
    assert.ok(process.memoryUsage().arrayBuffers - heap < 32 * M, 'no allocation from the claimed size');
    const { path: req } = fixture(dir);
    const meta = regions(req).meta;
    writeAt(req, meta + 32 + 32 * 2, Buffer.from('an unknown item!')); // page 83's GUID; the item is required
    await refused(req, 'IMAGE_UNSUPPORTED', 'metadata.entry[2]');
    const { path: out } = fixture(dir);
    writeAt(out, regions(out).meta + 32 + 16, u32(2 * M)); // file parameters item offset past the 1 MiB region
    await refused(out, 'IMAGE_CORRUPT', 'metadata.file_parameters');
  });

  test('writable opens and reopens are refused naming the format; a read-only reopen is a no-op', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t);
    const { path } = fixture(dir);
    await assert.rejects(openImage({ filename: path, readOnly: false }), {
      code: 'NOT_SUPPORTED',
      message: /vhdx images are served read-only/,
    });
    const img = await openImage({ filename: path, readOnly: true });
    try {
      await img.node.reopen({ readOnly: true });
      await assert.rejects(img.node.reopen({ readOnly: false }), { code: 'NOT_SUPPORTED' });
      assert.equal(img.node.readOnly, true);
      assert.equal(img.node.capabilities().write, false);
    } finally {
      await img.close();
    }
  });

  test('a truncated image and a log GUID over an empty log', { skip, timeout: 60_000 }, async (t) => {
    const dir = tempDir(t);
    const { path: cut } = fixture(dir);
    truncateSync(cut, 6 * M);
    await refused(cut, 'IMAGE_CORRUPT', /^(region_table\.entry\[\d\]|bat\[\d+\])$/);
    // A log GUID with no valid entry behind it: nothing to replay (QEMU opens it too).
    const { path: guid, raw } = fixture(dir);
    const h = currentHeaderOffset(guid);
    writeAt(guid, h + 48, Buffer.from('0123456789abcdef'));
    resealHeader(guid, h);
    assert.ok((await readAll(guid)).equals(raw));
  });
});
