/**
 * Hostile vmdk images: qemu-img-made images with hand-mutated headers,
 * grain directory and grain table entries, compressed grains and
 * descriptors. Each is refused with a coded BlkError naming the field (and
 * the line, for descriptors), at open or at the read that reaches the bad
 * entry; nothing hangs, and no allocation follows an unchecked field.
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import { isBlkError } from '../../src/errors.js';
import { missingTools, qemuImg, randomBytes, seededRandom, tempDir } from '../helpers/tools.js';
import { convertToVmdk, descriptorText, footerStream, makeRawSource, patch, sizes } from './vmdk-images.js';

const { M } = sizes;
const missing = missingTools('qemu-img', 'qemu-io');
const skip = missing.length ? `missing: ${missing.join(', ')}` : false;

/** Opens `image` read-only and reads it whole; resolves with the error, or undefined when everything worked. */
async function openAndRead(image: string, roots?: string[]): Promise<unknown> {
  try {
    const img = await openImage({ filename: image, format: 'vmdk', readOnly: true, allowedRoots: roots });
    try {
      const size = img.node.length();
      const chunk = Buffer.alloc(1024 * 1024);
      for (let off = 0; off < size; off += chunk.length) {
        await img.node.read(off, chunk.subarray(0, Math.min(chunk.length, size - off)));
      }
    } finally {
      await img.close();
    }
    return undefined;
  } catch (e) {
    return e;
  }
}

async function refused(image: string, code: string, field: RegExp, line?: number, roots?: string[]) {
  const e = await openAndRead(image, roots);
  assert.ok(e !== undefined, `${image}: expected ${code}, it opened and read`);
  assert.ok(isBlkError(e), `not a BlkError: ${String(e)}`);
  assert.equal(e.code, code, e.format());
  assert.match(e.place.field ?? '', field, e.format());
  if (line !== undefined) assert.equal(e.place.line, line, e.format());
}

interface Layout {
  gdOffset: number;
  rgdOffset: number;
  firstTable: number;
  firstGrain: number;
}

function layout(image: string): Layout {
  const b = readFileSync(image);
  const gdOffset = Number(b.readBigUInt64LE(56)) * 512;
  const firstTable = b.readUInt32LE(gdOffset) * 512;
  return {
    gdOffset,
    rgdOffset: Number(b.readBigUInt64LE(48)) * 512,
    firstTable,
    firstGrain: b.readUInt32LE(firstTable) * 512,
  };
}

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

describe('hostile vmdk images are refused with a coded error naming the field', {
  concurrency: false,
}, () => {
  test('sparse headers, grain directories and grain tables', { skip, timeout: 120_000 }, async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    makeRawSource(join(dir, 'src.raw'), 8 * M, 5);
    const good = join(dir, 'good.vmdk');
    convertToVmdk(join(dir, 'src.raw'), good, {});
    assert.equal(await openAndRead(good), undefined);
    const L = layout(good);
    const size = readFileSync(good).length;
    let n = 0;
    const mutant = (edits: [number, Buffer][]) => {
      const p = join(dir, `m${n++}.vmdk`);
      copyFileSync(good, p);
      for (const [off, b] of edits) patch(p, off, b);
      return p;
    };
    // Version 3 without compression opens read-only (QEMU refuses it only read-write); 4 is refused.
    assert.equal(await openAndRead(mutant([[4, u32(3)]])), undefined);
    await refused(mutant([[4, u32(4)]]), 'IMAGE_UNSUPPORTED', /^version$/);
    await refused(mutant([[44, u32(513)]]), 'IMAGE_INVALID', /^numGTEsPerGT$/);
    await refused(mutant([[44, u32(0)]]), 'IMAGE_INVALID', /^numGTEsPerGT$/);
    await refused(mutant([[20, u64(0n)]]), 'IMAGE_INVALID', /^grainSize$/);
    await refused(mutant([[20, u64(1n << 40n)]]), 'IMAGE_INVALID', /^grainSize$/);
    await refused(mutant([[12, u64(1n << 60n)]]), 'IMAGE_TOO_LARGE', /^capacity$/);
    await refused(mutant([[12, u64(1n << 43n)]]), 'IMAGE_INVALID', /^capacity$/);
    // A capacity whose directory would lie past the end of the file: refused before it is allocated.
    await refused(mutant([[12, u64(1n << 36n)]]), 'IMAGE_CORRUPT', /^gdOffset$/);
    await refused(mutant([[56, u64(BigInt(size / 512))]]), 'IMAGE_CORRUPT', /^gdOffset$/);
    await refused(mutant([[56, u64(1n << 62n)]]), 'IMAGE_CORRUPT', /^gdOffset$/);
    await refused(mutant([[48, u64(BigInt(size / 512 + 7))]]), 'IMAGE_CORRUPT', /^rgdOffset$/);
    await refused(mutant([[64, u64(BigInt(size / 512 + 1))]]), 'IMAGE_CORRUPT', /^overHead$/);
    await refused(mutant([[77, Buffer.from([7, 0])]]), 'IMAGE_UNSUPPORTED', /^compressAlgorithm$/);
    await refused(mutant([[0, Buffer.from('COWD')]]), 'IMAGE_UNSUPPORTED', /^magic$/);
    // The header says "grain directory at the end", but the file is no stream: no footer.
    await refused(mutant([[56, u64(0xffffffffffffffffn)]]), 'IMAGE_CORRUPT', /footer marker/);
    // Tables and grains past the end of the file, found by the read that reaches them.
    await refused(mutant([[L.gdOffset, u32(size / 512)]]), 'IMAGE_CORRUPT', /^grain directory entry 0$/);
    await refused(
      mutant([[L.firstTable, u32(size / 512 + 100)]]),
      'IMAGE_CORRUPT',
      /^grain table 0 entry 0$/,
    );
    await refused(mutant([[L.firstTable, u32(size / 512 - 1)]]), 'IMAGE_CORRUPT', /^grain table 0 entry 0$/);
    // A huge CID field and a descriptor that is not text at all.
    await refused(
      mutant([[512, Buffer.from('# Disk DescriptorFile\nversion=1\nCID=xyz\n')]]),
      'IMAGE_INVALID',
      /^CID$/,
      3,
    );
    await refused(mutant([[512, Buffer.alloc(10 * 512, 0x41)]]), 'IMAGE_INVALID', /^CID$/);
  });

  test('streamOptimized grains and footers', { skip, timeout: 120_000 }, async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    makeRawSource(join(dir, 'src.raw'), 8 * M, 6);
    const good = join(dir, 'good.vmdk');
    convertToVmdk(join(dir, 'src.raw'), good, { subformat: 'streamOptimized' });
    const L = layout(good);
    let n = 0;
    const mutant = (edits: [number, Buffer][], from = good) => {
      const p = join(dir, `m${n++}.vmdk`);
      copyFileSync(from, p);
      for (const [off, b] of edits) patch(p, off, b);
      return p;
    };
    await refused(
      mutant([[L.firstGrain + 8, u32(0x7fffffff)]]),
      'IMAGE_CORRUPT',
      /^compressed grain at \d+$/,
    );
    await refused(mutant([[L.firstGrain + 8, u32(0)]]), 'IMAGE_CORRUPT', /^compressed grain at \d+$/);
    await refused(
      mutant([[L.firstGrain + 12, randomBytes(seededRandom(1), 64)]]),
      'IMAGE_CORRUPT',
      /^compressed grain/,
    );
    const footer = join(dir, 'footer.vmdk');
    footerStream(good, footer);
    assert.equal(await openAndRead(footer), undefined);
    const fsize = readFileSync(footer).length;
    await refused(mutant([[fsize - 1536 + 12, u32(2)]], footer), 'IMAGE_CORRUPT', /^footer marker$/);
    await refused(mutant([[fsize - 1024, Buffer.from('XXXX')]], footer), 'IMAGE_CORRUPT', /^footer magic$/);
    await refused(mutant([[fsize - 512 + 12, u32(1)]], footer), 'IMAGE_CORRUPT', /^end-of-stream marker$/);
    await refused(
      mutant([[fsize - 1024 + 56, u64(0xffffffffffffffffn)]], footer),
      'IMAGE_CORRUPT',
      /^gdOffset$/,
    );
  });

  test('descriptors: refusals name the file, the line and the field', async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    mkdirSync(join(dir, 'img'));
    writeFileSync(join(dir, 'img', 'data.bin'), Buffer.alloc(64 * 1024, 1));
    writeFileSync(join(dir, 'outside.bin'), Buffer.alloc(64 * 1024, 2));
    let n = 0;
    const desc = (text: string) => {
      const p = join(dir, 'img', `d${n++}.vmdk`);
      writeFileSync(p, text);
      return p;
    };
    const flat = ['RW 128 FLAT "data.bin" 0'];
    assert.equal(await openAndRead(desc(descriptorText('monolithicFlat', flat))), undefined);
    // Extent lines start at line 8 of descriptorText's layout (one extra key moves them down).
    await refused(
      desc(descriptorText('monolithicFlat', ['RW abc FLAT "data.bin" 0'])),
      'IMAGE_INVALID',
      /^extent$/,
      8,
    );
    await refused(
      desc(descriptorText('monolithicFlat', ['RW 128 FLAT "data.bin"'])),
      'IMAGE_INVALID',
      /^extent offset$/,
      8,
    );
    await refused(
      desc(descriptorText('monolithicFlat', ['RW 0 FLAT "data.bin" 0'])),
      'IMAGE_INVALID',
      /^extent size$/,
      8,
    );
    await refused(
      desc(descriptorText('monolithicFlat', ['RW 99999999999999999 FLAT "data.bin" 0'])),
      'IMAGE_INVALID',
      /^extent size$/,
      8,
    );
    await refused(
      desc(descriptorText('monolithicFlat', ['NOACCESS 128 FLAT "data.bin" 0'])),
      'IMAGE_UNSUPPORTED',
      /^access$/,
      8,
    );
    await refused(
      desc(descriptorText('monolithicFlat', ['RW 128 SESPARSE "data.bin"'])),
      'IMAGE_UNSUPPORTED',
      /^type$/,
      8,
    );
    await refused(
      desc(descriptorText('monolithicFlat', ['RW 128 VMFSSPARSE "data.bin"'])),
      'IMAGE_UNSUPPORTED',
      /^type$/,
      8,
    );
    await refused(
      desc(descriptorText('monolithicFlat', ['RW 128 VMFSRDM "data.bin"'])),
      'IMAGE_UNSUPPORTED',
      /^type$/,
      8,
    );
    await refused(desc(descriptorText('seSparse', flat)), 'IMAGE_UNSUPPORTED', /^createType$/, 5);
    await refused(desc(descriptorText('vsanSparse', flat)), 'IMAGE_UNSUPPORTED', /^createType$/, 5);
    await refused(desc(descriptorText('streamOptimized', flat)), 'IMAGE_UNSUPPORTED', /^createType$/, 5);
    await refused(desc(descriptorText('monolithicFlat', [])), 'IMAGE_INVALID', /^extent$/);
    await refused(
      desc(descriptorText('monolithicFlat', flat).replace('CID=12345678', 'CID=1234567g')),
      'IMAGE_INVALID',
      /^CID$/,
      3,
    );
    await refused(
      desc(descriptorText('monolithicFlat', flat).replace('CID=12345678\n', '')),
      'IMAGE_INVALID',
      /^CID$/,
    );
    await refused(
      desc(descriptorText('monolithicFlat', flat).replace('parentCID=ffffffff\n', '')),
      'IMAGE_INVALID',
      /^parentCID$/,
    );
    await refused(
      desc(descriptorText('monolithicFlat', flat).replace('version=1', 'version=9')),
      'IMAGE_UNSUPPORTED',
      /^version$/,
      2,
    );
    await refused(
      desc(descriptorText('monolithicFlat', flat).replace('createType="monolithicFlat"\n', '')),
      'IMAGE_INVALID',
      /^createType$/,
    );
    await refused(
      desc(descriptorText('monolithicFlat', Array(5000).fill(flat[0]!))),
      'IMAGE_UNSUPPORTED',
      /^extent$/,
    );
    // Extent files are names from the image: the path policy confines them like backing files.
    for (const name of [
      '../outside.bin',
      `${dir}/outside.bin`,
      'nbd:localhost:10809',
      'json:{driver:file}',
    ]) {
      await refused(
        desc(descriptorText('monolithicFlat', [`RW 128 FLAT "${name}" 0`])),
        'BACKING_POLICY',
        /^extent file \(line 8\)$/,
      );
    }
    await refused(
      desc(descriptorText('monolithicFlat', ['RW 128 FLAT "missing.bin" 0'])),
      'BACKING_CHAIN',
      /^extent file/,
    );
    // A SPARSE extent that is not a sparse file, and one that is itself a descriptor.
    await refused(
      desc(descriptorText('twoGbMaxExtentSparse', ['RW 128 SPARSE "data.bin"'])),
      'IMAGE_INVALID',
      /^magic$/,
    );
    const nested = desc(descriptorText('monolithicFlat', flat));
    const kdmv = Buffer.alloc(512);
    kdmv.write('KDMV');
    kdmv.writeBigUInt64LE(1n, 28);
    writeFileSync(join(dir, 'img', 'nested.vmdk'), Buffer.concat([kdmv, readFileSync(nested)]));
    await refused(
      desc(descriptorText('twoGbMaxExtentSparse', ['RW 128 SPARSE "nested.vmdk"'])),
      'IMAGE_UNSUPPORTED',
      /^capacity$/,
    );
    // 1 MiB of noise: refused quickly, no hang.
    await refused(
      desc(randomBytes(seededRandom(2), 1024 * 1024).toString('latin1')),
      'IMAGE_INVALID',
      /createType|extent|CID|version|parentFileNameHint/,
    );
  });

  test('parents: the path policy, cycles, CID mismatches; writable opens', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    mkdirSync(join(dir, 'img'));
    qemuImg('create', '-q', '-f', 'vmdk', join(dir, 'base.vmdk'), '4M');
    qemuImg('create', '-q', '-f', 'vmdk', join(dir, 'img', 'base.vmdk'), '4M');
    const child = join(dir, 'img', 'child.vmdk');
    qemuImg('create', '-q', '-f', 'vmdk', '-b', '../base.vmdk', '-F', 'vmdk', child);
    await refused(child, 'BACKING_POLICY', /^parentFileNameHint$/);
    // A parent inside the allowed directory opens; naming itself is a cycle.
    const inside = join(dir, 'img', 'inside.vmdk');
    qemuImg('create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', inside);
    assert.equal(await openAndRead(inside), undefined);
    const text = readFileSync(inside)
      .subarray(512, 512 * 21)
      .toString('latin1');
    const withText = (name: string, t2: string) => {
      const p = join(dir, 'img', name);
      copyFileSync(inside, p);
      patch(p, 512, Buffer.from(t2.padEnd(text.length, '\0'), 'latin1'));
      return p;
    };
    await refused(
      withText('self.vmdk', text.replace('"base.vmdk"', '"self.vmdk"')),
      'BACKING_CHAIN',
      /^parentFileNameHint$/,
    );
    // parentCID no longer the parent's CID: the open works (as in QEMU), reads that reach the parent are refused.
    const wrong = withText('wrong.vmdk', text.replace(/parentCID=[0-9a-f]+/, 'parentCID=0badc1d0'));
    await refused(wrong, 'BACKING_CHAIN', /^parentCID$/);
    // Writable: refused naming the format.
    await assert.rejects(openImage({ filename: join(dir, 'base.vmdk'), readOnly: false }), (e: unknown) => {
      assert.ok(isBlkError(e));
      assert.equal(e.code, 'READ_ONLY');
      assert.match(e.message, /vmdk/);
      return true;
    });
  });

  test('300 random mutants of a sparse and a stream image: refused with a code or read, never a crash or hang', {
    skip,
    timeout: 180_000,
  }, async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    makeRawSource(join(dir, 'src.raw'), 4 * M, 8);
    const seeds = ['monolithicSparse', 'streamOptimized'].map((sf) => {
      const p = join(dir, `${sf}.vmdk`);
      convertToVmdk(join(dir, 'src.raw'), p, { subformat: sf });
      return p;
    });
    const rand = seededRandom(42);
    for (let i = 0; i < 300; i++) {
      const from = seeds[i % 2]!;
      const L = layout(from);
      const b = readFileSync(from);
      const targets = [0, 512, L.gdOffset, L.firstTable, L.firstGrain];
      for (let k = 0; k < 1 + Math.floor(rand() * 4); k++) {
        const base = targets[Math.floor(rand() * targets.length)]!;
        const at = Math.min(b.length - 1, base + Math.floor(rand() * (base === 0 ? 80 : 256)));
        b[at] = rand() < 0.5 ? Math.floor(rand() * 256) : b[at]! ^ (1 << Math.floor(rand() * 8));
      }
      const p = join(dir, 'mutant.vmdk');
      writeFileSync(p, b);
      const e = await openAndRead(p);
      if (e !== undefined) assert.ok(isBlkError(e), `mutant ${i}: not a BlkError: ${(e as Error).stack}`);
    }
  });
});
