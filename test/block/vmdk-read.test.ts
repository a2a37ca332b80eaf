/**
 * The native vmdk reader against the real qemu-img: every subformat and
 * create option qemu-img offers, converted from a raw file with random,
 * zero and compressible content; each image read whole (when small) and by
 * 2000 random unaligned reads, compared with `qemu-img convert -O raw`, and
 * `info` compared with `qemu-img info --output=json`. Plus the layouts
 * qemu-img reads but does not write (a stream with the footer grain
 * directory, a descriptor embedded in a sparse header, vmfs descriptors,
 * flat extents sharing a file), a parent chain, and ZERO extents.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import type { BlockNode } from '../../src/block/types.js';
import { imageInfoJson } from '../../src/cli/commands/info.js';
import {
  missingTools,
  qemuImg,
  qemuIo,
  randomBytes,
  runOk,
  seededRandom,
  tempDir,
} from '../helpers/tools.js';
import { readViaMap } from './read-via-map.js';
import {
  convertToVmdk,
  descriptorText,
  embeddedDescriptor,
  footerStream,
  makeRawSource,
  oracleRaw,
  type Region,
  readRange,
  sizes,
} from './vmdk-images.js';

const { K, M, G } = sizes;
const SMALL = 72 * M + 1536; // not a whole number of grains: the last grain is partial
const LARGE = 4 * G + M + 512; // three 2 GiB extents for the twoGbMaxExtent* subformats

const missing = missingTools('qemu-img', 'qemu-io');
const skip = missing.length ? `missing: ${missing.join(', ')}` : false;

/** Whole-image comparison (small images), then 2000 random reads, half of them starting in written regions. */
async function compareReads(image: string, raw: string, regions: Region[], whole: boolean): Promise<void> {
  const img = await openImage({ filename: image, readOnly: true });
  const fd = openSync(raw, 'r');
  try {
    const size = img.node.length();
    if (whole) {
      const chunk = 4 * M + 4097;
      const a = Buffer.alloc(chunk);
      const b = Buffer.alloc(chunk);
      for (let off = 0; off < size; off += chunk) {
        const n = Math.min(chunk, size - off);
        await img.node.read(off, a.subarray(0, n));
        readSync(fd, b, 0, n, off);
        if (!a.subarray(0, n).equals(b.subarray(0, n))) {
          let i = 0;
          while (a[i] === b[i]) i++;
          assert.fail(`first difference at guest offset ${off + i}`);
        }
      }
    }
    if (whole) await compareMapped(img.node, fd, size);
    const rand = seededRandom(size % 100_003);
    for (let batch = 0; batch < 125; batch++) {
      const jobs: Promise<void>[] = [];
      for (let j = 0; j < 16; j++) {
        const len = 1 + Math.floor(rand() < 0.6 ? rand() * 9000 : rand() * 300 * K);
        const r = regions[Math.floor(rand() * regions.length)]!;
        const start =
          rand() < 0.5 ? r.off + Math.floor(rand() * r.len) - Math.floor(rand() * 70 * K) : rand() * size;
        const off = Math.max(0, Math.min(Math.floor(start), size - 1));
        const n = Math.min(len, size - off);
        jobs.push(
          (async () => {
            const got = Buffer.alloc(n);
            await img.node.read(off, got);
            const want = Buffer.alloc(n);
            readSync(fd, want, 0, n, off);
            assert.ok(got.equals(want), `random read ${off}+${n} differs`);
          })(),
        );
      }
      await Promise.all(jobs);
    }
  } finally {
    closeSync(fd);
    await img.close();
  }
}

/**
 * The FUSE fast path's view: after a whole read the grain tables are cached,
 * so mapHostCached maps every range (compressed grains to their compressed
 * bytes); the bytes read through the host extents it names (from those fds,
 * compressed grains inflated as JavaScript does) must be the guest bytes.
 */
async function compareMapped(node: BlockNode, rawFd: number, size: number): Promise<void> {
  const chunk = M + 4096;
  let mapped = 0;
  for (let off = 0; off < size; off += chunk) {
    const n = Math.min(chunk, size - off);
    const got = await readViaMap(node, off, n);
    if (!got) continue;
    const want = Buffer.alloc(n);
    readSync(rawFd, want, 0, n, off);
    assert.ok(got.equals(want), `mapped bytes in [${off}, ${off + n}) differ`);
    mapped += n;
  }
  assert.ok(mapped > 0, 'the fast path maps something');
}

type Specific = { type: string; data: Record<string, unknown> };

/** Our `info` against qemu-img's, field by field (extent file names by base name: qemu-img shows them as given). */
async function compareInfo(image: string): Promise<void> {
  const ours = (await imageInfoJson(image))[0]!;
  const theirs = JSON.parse(runOk('qemu-img', ['info', '--output=json', '-U', image])) as Record<
    string,
    unknown
  >;
  for (const f of ['virtual-size', 'format', 'cluster-size', 'backing-filename', 'backing-filename-format']) {
    assert.deepEqual(ours[f], theirs[f], `info field ${f}`);
  }
  // actual-size: qemu-img counts a file once per extent that names it, we count each file once.
  const names = ((ours['format-specific'] as Specific).data.extents as { filename: string }[]).map(
    (x) => x.filename,
  );
  if (new Set(names).size === names.length)
    assert.equal(ours['actual-size'], theirs['actual-size'], 'actual-size');
  // qemu-img leaves dirty-flag out when extents of different kinds make vmdk's get_info fail.
  if (theirs['dirty-flag'] !== undefined)
    assert.equal(ours['dirty-flag'], theirs['dirty-flag'], 'dirty-flag');
  const od = (ours['format-specific'] as Specific).data;
  const td = (theirs['format-specific'] as Specific).data;
  for (const f of ['cid', 'parent-cid', 'create-type'])
    assert.deepEqual(od[f], td[f], `format-specific ${f}`);
  const norm = (xs: unknown) =>
    (xs as Record<string, unknown>[]).map((x) => ({ ...x, filename: basename(String(x.filename)) }));
  assert.deepEqual(norm(od.extents), norm(td.extents), 'format-specific extents');
}

interface Case {
  name: string;
  size: number;
  opts: Record<string, string>;
  /** qemu-io commands run on the image after the conversion. */
  io?: string[];
}

const CASES: Case[] = [
  { name: 'monolithicSparse', size: SMALL, opts: { subformat: 'monolithicSparse' } },
  { name: 'monolithicFlat', size: SMALL, opts: { subformat: 'monolithicFlat' } },
  { name: 'twoGbMaxExtentSparse', size: SMALL, opts: { subformat: 'twoGbMaxExtentSparse' } },
  { name: 'twoGbMaxExtentFlat', size: SMALL, opts: { subformat: 'twoGbMaxExtentFlat' } },
  {
    name: 'streamOptimized (deflate grains with markers, version 3)',
    size: SMALL,
    opts: { subformat: 'streamOptimized' },
  },
  { name: 'twoGbMaxExtentSparse, three extents', size: LARGE, opts: { subformat: 'twoGbMaxExtentSparse' } },
  { name: 'twoGbMaxExtentFlat, three extents', size: LARGE, opts: { subformat: 'twoGbMaxExtentFlat' } },
  { name: 'compat6', size: SMALL, opts: { compat6: 'on' } },
  { name: 'adapter_type=lsilogic', size: SMALL, opts: { adapter_type: 'lsilogic' } },
  { name: 'adapter_type=buslogic', size: SMALL, opts: { adapter_type: 'buslogic' } },
  {
    name: 'adapter_type=legacyESX, twoGbMaxExtentFlat',
    size: SMALL,
    opts: { adapter_type: 'legacyESX', subformat: 'twoGbMaxExtentFlat' },
  },
  { name: 'hwversion=10', size: SMALL, opts: { hwversion: '10' } },
  {
    name: 'zeroed_grain=on (version 2, zero grains as grain table entry 1)',
    size: SMALL,
    opts: { zeroed_grain: 'on' },
    io: ['write -z 0 128k', 'write -z 33554432 1m', 'write -z 1000000 70000'],
  },
  {
    name: 'zeroed_grain=on, twoGbMaxExtentSparse',
    size: SMALL,
    opts: { zeroed_grain: 'on', subformat: 'twoGbMaxExtentSparse' },
    io: ['write -z 0 64k', 'write -z 65536000 2m'],
  },
];

describe('vmdk images made by qemu-img read byte-identical to qemu-img convert -O raw', {
  concurrency: false,
}, () => {
  for (const c of CASES) {
    test(c.name, { skip, timeout: 180_000 }, async (t) => {
      const dir = tempDir(t, 'blkexport-vmdk-');
      const src = join(dir, 'src.raw');
      const regions = makeRawSource(src, c.size, c.size % 9973);
      const image = join(dir, 'disk.vmdk');
      convertToVmdk(src, image, c.opts);
      if (c.io) qemuIo('-f', 'vmdk', ...c.io.flatMap((x) => ['-c', x]), image);
      const raw = oracleRaw(image, join(dir, 'oracle.raw'));
      await compareReads(image, raw, regions, c.size === SMALL);
      await compareInfo(image);
    });
  }

  test('a streamOptimized image with the grain directory in the footer (gdOffset = GD_AT_END)', {
    skip,
    timeout: 120_000,
  }, async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    const src = join(dir, 'src.raw');
    const regions = makeRawSource(src, SMALL, 7);
    const qemuMade = join(dir, 'qemu-stream.vmdk');
    convertToVmdk(src, qemuMade, { subformat: 'streamOptimized' });
    const image = join(dir, 'footer.vmdk');
    footerStream(qemuMade, image);
    assert.equal(
      readRange(image, 56, 8).readBigUInt64LE(0),
      0xffffffffffffffffn,
      'the header defers to the footer',
    );
    const raw = oracleRaw(image, join(dir, 'oracle.raw'));
    assert.ok(
      raw && readRange(raw, regions[0]!.off, 16).some((x) => x !== 0),
      'qemu-img reads the footer too',
    );
    await compareReads(image, raw, regions, true);
    await compareInfo(image);
  });

  test('a descriptor embedded in a sparse header (capacity 0) naming SPARSE and FLAT extents', {
    skip,
    timeout: 120_000,
  }, async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    const src = join(dir, 'src.raw');
    const regions = makeRawSource(src, 8 * M, 11);
    convertToVmdk(src, join(dir, 'part.vmdk'), { subformat: 'monolithicSparse' });
    writeFileSync(join(dir, 'flat.bin'), randomBytes(seededRandom(3), 3 * M));
    const text = descriptorText('twoGbMaxExtentSparse', [
      'RW 2048 FLAT "flat.bin" 0',
      'RW 16384 SPARSE "part.vmdk"',
      'RW 1000 FLAT "flat.bin" 4000',
    ]);
    const image = join(dir, 'embedded.vmdk');
    embeddedDescriptor(join(dir, 'part.vmdk'), image, text);
    const raw = oracleRaw(image, join(dir, 'oracle.raw'));
    const shifted = regions.map((r) => ({ off: r.off + M, len: r.len }));
    await compareReads(image, raw, shifted, true);
    await compareInfo(image);
  });

  test('descriptor files: vmfs (VMFS extent), monolithicFlat with several FLAT extents of one file at offsets', {
    skip,
    timeout: 120_000,
  }, async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    writeFileSync(join(dir, 'data.bin'), randomBytes(seededRandom(5), 6 * M));
    const cases: [string, string[]][] = [
      ['vmfs', ['RW 8192 VMFS "data.bin"']],
      [
        'monolithicFlat',
        ['RW 2048 FLAT "data.bin" 8000', 'RW 100 FLAT "data.bin" 0', 'RW 4096 FLAT "data.bin" 5'],
      ],
      // A flat extent that runs past the end of its file reads zeroes there (QEMU's reads past EOF).
      ['twoGbMaxExtentFlat', ['RW 4096 FLAT "data.bin" 11000', 'RW 64 FLAT "data.bin" 1']],
    ];
    for (const [ct, lines] of cases) {
      const image = join(dir, `${ct}.vmdk`);
      writeFileSync(image, descriptorText(ct, lines));
      const raw = oracleRaw(image, join(dir, `${ct}.raw`));
      await compareReads(image, raw, [{ off: 0, len: 512 }], true);
      await compareInfo(image);
    }
  });

  test('a parent chain of three (parentFileNameHint, CID/parentCID), with zero grains over parent data', {
    skip,
    timeout: 120_000,
  }, async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    const src = join(dir, 'src.raw');
    const regions = makeRawSource(src, SMALL, 21);
    convertToVmdk(src, join(dir, 'base.vmdk'), {});
    qemuImg('create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', join(dir, 'mid.vmdk'));
    qemuIo(
      '-f',
      'vmdk',
      '-c',
      'write -P 0x61 100k 300k',
      '-c',
      'write -P 0x62 33554000 70k',
      join(dir, 'mid.vmdk'),
    );
    qemuImg(
      'create',
      '-q',
      '-f',
      'vmdk',
      '-o',
      'zeroed_grain=on',
      '-b',
      'mid.vmdk',
      '-F',
      'vmdk',
      join(dir, 'top.vmdk'),
    );
    qemuIo(
      '-f',
      'vmdk',
      '-c',
      'write -P 0x63 200k 64k',
      '-c',
      'write -z 0 64k',
      '-c',
      'write -z 33554432 64k',
      join(dir, 'top.vmdk'),
    );
    const image = join(dir, 'top.vmdk');
    const raw = oracleRaw(image, join(dir, 'oracle.raw'));
    await compareReads(
      image,
      raw,
      [...regions, { off: 100 * K, len: 300 * K }, { off: 0, len: 64 * K }],
      true,
    );
    await compareInfo(image);
    const chain = await imageInfoJson(image, { backingChain: true });
    assert.deepEqual(
      chain.map((x) => basename(String(x.filename))),
      ['top.vmdk', 'mid.vmdk', 'base.vmdk'],
    );
    // A qcow2 overlay may name a vmdk backing file (by its recorded format).
    const q = join(dir, 'over.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'top.vmdk', '-F', 'vmdk', q);
    qemuIo('-f', 'qcow2', '-c', 'write -P 0x64 300k 64k', q);
    await compareReads(
      q,
      oracleRaw(q, join(dir, 'q.raw')),
      [{ off: 300 * K, len: 64 * K }, ...regions],
      true,
    );
  });
});

describe('vmdk beyond qemu-img', () => {
  test('ZERO extents read as zeroes of their size (the VMware layout; QEMU skips ZERO lines)', async (t) => {
    const dir = tempDir(t, 'blkexport-vmdk-');
    const data = randomBytes(seededRandom(9), 64 * K);
    writeFileSync(join(dir, 'a.bin'), data);
    const image = join(dir, 'z.vmdk');
    writeFileSync(
      image,
      descriptorText('monolithicFlat', ['RW 32 FLAT "a.bin" 0', 'RW 100 ZERO', 'RDONLY 64 FLAT "a.bin" 32']),
    );
    const img = await openImage({ filename: image, readOnly: true });
    try {
      assert.equal(img.node.length(), (32 + 100 + 64) * 512);
      const got = Buffer.alloc(img.node.length());
      await img.node.read(0, got);
      const want = Buffer.concat([
        data.subarray(0, 16 * K),
        Buffer.alloc(100 * 512),
        data.subarray(16 * K, 48 * K),
      ]);
      assert.ok(got.equals(want));
      const st = await img.node.blockStatus(16 * K, 100 * 512);
      assert.deepEqual(st, { offset: 16 * K, length: 100 * 512, data: false, zero: true });
      // The flat pieces map to the file (FUSE fast path), the ZERO extent to zeroes.
      const map = img.node.mapHostCached?.(0, img.node.length());
      assert.ok(map);
      assert.deepEqual(
        map.map((x) => ('zero' in x ? ['zero', x.length] : ['fd', x.length, (x as { host: number }).host])),
        [
          ['fd', 16 * K, 0],
          ['zero', 100 * 512],
          ['fd', 32 * K, 16 * K],
        ],
      );
    } finally {
      await img.close();
    }
  });
});
