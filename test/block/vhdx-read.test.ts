/**
 * The vhdx read path against QEMU: images made by qemu-img (every subformat,
 * block size, log size and block_state_zero setting) and written by qemu-io
 * or qemu-img convert read byte-identical to `qemu-img convert -O raw`, in
 * full and in 2000 random unaligned reads; ranges the FUSE fast path maps
 * (mapHostCached) hold the same bytes; `info -o json` equals
 * `qemu-img info --output=json`. Also: a log QEMU left behind (a write whose
 * in-place BAT update failed) is replayed in memory, equal to what
 * `qemu-img check -r all` makes of a copy, and the file is not touched; an
 * image with 4096-byte logical sectors (QEMU refuses those) reads the same
 * bytes as its 512-byte twin.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, copyFileSync, openSync, readFileSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/index.js';
import { imageInfoJson } from '../../src/cli/commands/info.js';
import { missingTools, qemuImg, randomBytes, run, runOk, seededRandom, tempDir } from '../helpers/tools.js';
import { applyWrites, convertToRaw, scatteredWrites, type Write } from './images.js';
import { readViaMap } from './read-via-map.js';
import { createVhdx, K, M, setLogicalSectorSize } from './vhdx-images.js';

interface Case {
  name: string;
  block: number;
  /** Compare every byte (false for huge sparse disks: only the random reads and `ranges`). */
  full?: boolean;
  ranges?: [number, number][];
  build(dir: string): string;
}

function written(
  name: string,
  size: number,
  opts: Record<string, string>,
  block: number,
  seed: number,
  extra: Write[] = [],
): Case {
  return {
    name,
    block,
    build(dir) {
      const img = createVhdx(join(dir, 'img.vhdx'), size, opts);
      applyWrites(dir, img, 'vhdx', [...scatteredWrites(seed, size, block, 4 * block), ...extra], seed);
      return img;
    },
  };
}

/** A raw file with random data at scattered places, zero runs between, and constant runs. */
function sparseSource(dir: string, size: number, seed: number, dense = false): string {
  const path = join(dir, 'src.raw');
  const fd = openSync(path, 'w');
  const rand = seededRandom(seed);
  const writes = dense
    ? [{ off: 0, len: size, kind: 'data' }]
    : scatteredWrites(seed, size, 1 * M, 8 * M, 16);
  for (const w of writes) {
    const data =
      !dense && rand() < 0.3 ? Buffer.alloc(w.len, 0x41 + Math.floor(rand() * 20)) : randomBytes(rand, w.len);
    for (let done = 0; done < data.length; )
      done += writeSync(fd, data, done, data.length - done, w.off + done);
  }
  closeSync(fd);
  run('truncate', ['-s', String(size), path]);
  return path;
}

function converted(
  name: string,
  size: number,
  opts: Record<string, string>,
  block: number,
  seed: number,
  dense = false,
): Case {
  return {
    name,
    block,
    build(dir) {
      const src = sparseSource(dir, size, seed, dense);
      const img = join(dir, 'img.vhdx');
      const o = Object.entries(opts)
        .map(([k, v]) => `${k}=${v}`)
        .join(',');
      qemuImg('convert', '-O', 'vhdx', ...(o ? ['-o', o] : []), src, img);
      return img;
    },
  };
}

const G = 1024 * M;

const CASES: Case[] = [
  written(
    'dynamic, 1 MiB blocks, 1 MiB log, scattered qemu-io writes',
    40 * M,
    { block_size: '1M', log_size: '1M' },
    M,
    1,
  ),
  written(
    'dynamic, 8 MiB blocks, block_state_zero=off, data and zero writes',
    100 * M,
    { block_size: '8M', block_state_zero: 'off' },
    8 * M,
    2,
    [
      { off: 3 * M + 512, len: 200 * K, kind: 'zero' },
      { off: 50 * M, len: 9 * M, kind: 'zero' },
    ],
  ),
  written('dynamic, 32 MiB blocks, 4 MiB log', 150 * M, { block_size: '32M', log_size: '4M' }, 32 * M, 3),
  written('fixed, 1 MiB blocks, scattered writes', 24 * M, { subformat: 'fixed', block_size: '1M' }, M, 4),
  converted(
    'qemu-img convert of a sparse raw, dynamic, 4 MiB blocks',
    90 * M,
    { block_size: '4M' },
    4 * M,
    5,
  ),
  converted(
    'qemu-img convert of a dense random raw, fixed, 16 MiB blocks',
    40 * M,
    { subformat: 'fixed', block_size: '16M' },
    16 * M,
    6,
    true,
  ),
  converted(
    'qemu-img convert, dynamic, block_state_zero=off, 2 MiB log',
    30 * M,
    { block_state_zero: 'off', log_size: '2M' },
    8 * M,
    7,
  ),
  written(
    'default options (8 MiB blocks), size not a multiple of the block size',
    10 * M + 1536,
    {},
    8 * M,
    8,
  ),
  {
    name: 'empty dynamic image (zero-state blocks)',
    block: 8 * M,
    build: (dir) => createVhdx(join(dir, 'img.vhdx'), 64 * M),
  },
  {
    name: 'empty dynamic image, block_state_zero=off (not-present blocks)',
    block: M,
    build: (dir) => createVhdx(join(dir, 'img.vhdx'), 16 * M, { block_state_zero: 'off', block_size: '1M' }),
  },
  {
    name: '5 GiB sparse dynamic image: blocks around the first sector bitmap entry (chunk boundary at 4 GiB)',
    block: M,
    full: false,
    ranges: [
      [4 * G - 3 * M, 6 * M],
      [5 * G - 2 * M, 2 * M],
      [0, 2 * M],
    ],
    build(dir) {
      const img = createVhdx(join(dir, 'img.vhdx'), 5 * G, { block_size: '1M' });
      const writes: Write[] = [
        { off: 4 * G - 2 * M + 100, len: 3 * M, kind: 'data' },
        { off: 4 * G + 5 * M, len: 70 * K, kind: 'data' },
        { off: 5 * G - M - 1000, len: M + 1000, kind: 'data' },
        ...scatteredWrites(9, 5 * G, M, 4 * G, 6),
      ];
      applyWrites(dir, img, 'vhdx', writes, 9);
      return img;
    },
  },
];

function sameBytes(got: Buffer, want: Buffer, where: number): void {
  if (got.equals(want)) return;
  let i = 0;
  while (got[i] === want[i]) i++;
  assert.fail(`first difference at guest offset ${where + i}`);
}

/** Every byte (or the given ranges), then 2000 random reads, 16 at a time, and fast-path mapped reads. */
async function compareWithRaw(
  image: string,
  raw: string,
  c: Pick<Case, 'block' | 'full' | 'ranges'>,
): Promise<void> {
  const img = await openImage({ filename: image, readOnly: true });
  const fd = openSync(raw, 'r');
  try {
    const node = img.node;
    const size = node.length();
    const want = (off: number, n: number) => {
      const b = Buffer.alloc(n);
      readSync(fd, b, 0, n, off);
      return b;
    };
    const ranges = c.full === false ? (c.ranges ?? []) : [[0, size] as [number, number]];
    for (const [start, len] of ranges) {
      for (let off = start; off < start + len; off += 4 * M) {
        const n = Math.min(4 * M, start + len - off);
        const got = Buffer.alloc(n);
        await node.read(off, got);
        sameBytes(got, want(off, n), off);
      }
    }
    const rand = seededRandom(size % 1000003);
    let mapped = 0;
    for (let batch = 0; batch < 125; batch++) {
      const jobs: Promise<void>[] = [];
      for (let j = 0; j < 16; j++) {
        const pick = rand();
        const len =
          1 + Math.floor(pick < 0.5 ? rand() * 4096 : pick < 0.8 ? rand() * 2 * M : rand() * 300 * K);
        // One read in five straddles a block boundary.
        const edge = Math.floor(rand() * (size / c.block)) * c.block - Math.floor(rand() * len);
        const at = rand() < 0.2 ? edge : Math.floor(rand() * Math.max(1, size - len));
        const off = Math.max(0, Math.min(size - 1, at));
        const n = Math.min(len, size - off);
        jobs.push(
          (async () => {
            const got = Buffer.alloc(n);
            await node.read(off, got);
            sameBytes(got, want(off, n), off);
            const viaMap = await readViaMap(node, off, n);
            if (viaMap) {
              mapped++;
              sameBytes(viaMap, got, off);
            }
          })(),
        );
      }
      await Promise.all(jobs);
    }
    // No log, no parent, no partial blocks: the BAT maps every range.
    assert.equal(mapped, 2000, 'every range maps through mapHostCached');
  } finally {
    closeSync(fd);
    await img.close();
  }
}

async function compareInfo(image: string): Promise<void> {
  const ours = (await imageInfoJson(image))[0]!;
  const theirs = JSON.parse(runOk('qemu-img', ['info', '--output=json', '-U', image])) as Record<
    string,
    unknown
  >;
  for (const k of new Set([...Object.keys(ours), ...Object.keys(theirs)])) {
    assert.deepEqual(ours[k], theirs[k], `info field ${k}`);
  }
}

const sha = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

describe('vhdx images made by qemu-img read byte-identical to qemu-img convert -O raw', () => {
  const missing = missingTools('qemu-img', 'qemu-io');
  const skip = missing.length ? `missing: ${missing.join(', ')}` : false;
  for (const c of CASES) {
    test(c.name, { skip, timeout: 120_000 }, async (t) => {
      const dir = tempDir(t);
      const image = c.build(dir);
      const check = run('qemu-img', ['check', image]);
      assert.equal(check.status, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
      const raw = convertToRaw(image, join(dir, 'oracle.raw'));
      await compareWithRaw(image, raw, c);
      await compareInfo(image);
    });
  }

  test('a log QEMU left behind is replayed in memory, like qemu-img check -r all, and the file is untouched', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t);
    const image = createVhdx(join(dir, 'img.vhdx'), 24 * M, { block_size: '1M', log_size: '1M' });
    const first: Write[] = [
      { off: 100, len: 300 * K, kind: 'data' },
      { off: 10 * M - 5000, len: 2 * M, kind: 'data' },
      { off: 23 * M, len: M, kind: 'data' },
    ];
    applyWrites(dir, image, 'vhdx', first, 30);
    // A second write allocates block 3; its BAT update goes to the log, then the in-place
    // write of the BAT sector (at 2 MiB: 1 MiB header section + 1 MiB log) fails: the log stays.
    const spec = {
      driver: 'vhdx',
      file: {
        driver: 'blkdebug',
        'inject-error': [{ event: 'pwritev', iotype: 'write', sector: (2 * M) / 512, once: true }],
        image: { driver: 'file', filename: image },
      },
    };
    const failed = run('qemu-io', ['-c', 'write -P 0xcd 3M 64k', `json:${JSON.stringify(spec)}`]);
    assert.match(failed.stdout + failed.stderr, /write failed/, 'the injected error must fail the write');
    // QEMU refuses to open it read-only.
    const info = run('qemu-img', ['info', image]);
    assert.notEqual(info.status, 0);
    assert.match(info.stderr, /contains a log that needs to be replayed/);
    const replayed = join(dir, 'replayed.vhdx');
    copyFileSync(image, replayed);
    const repair = run('qemu-img', ['check', '-r', 'all', replayed]);
    assert.ok(repair.status === 0, repair.stdout + repair.stderr);
    const raw = convertToRaw(replayed, join(dir, 'oracle.raw'));
    assert.ok(
      readFileSync(raw)
        .subarray(3 * M, 3 * M + 64 * K)
        .every((b) => b === 0xcd),
      'the replayed write holds',
    );
    const before = sha(image);
    const img = await openImage({ filename: image, readOnly: true });
    try {
      const got = Buffer.alloc(img.node.length());
      await img.node.read(0, got);
      sameBytes(got, readFileSync(raw), 0);
      // The block only the log's BAT entry allocates maps to the file for the fast path too.
      const viaMap = await readViaMap(img.node, 3 * M, 64 * K);
      assert.ok(
        viaMap?.every((b) => b === 0xcd),
        'mapped bytes of the replayed block',
      );
    } finally {
      await img.close();
    }
    assert.equal(sha(image), before, 'a read-only open never writes the file');
  });

  test('4096-byte logical sectors (QEMU refuses them) read like the 512-byte twin', {
    skip,
    timeout: 60_000,
  }, async (t) => {
    const dir = tempDir(t);
    const image = createVhdx(join(dir, 'img.vhdx'), 20 * M, { block_size: '2M' });
    applyWrites(dir, image, 'vhdx', scatteredWrites(40, 20 * M, 2 * M, 8 * M), 40);
    const raw = convertToRaw(image, join(dir, 'oracle.raw'));
    setLogicalSectorSize(image, 4096);
    assert.notEqual(run('qemu-img', ['info', image]).status, 0, 'QEMU 7.2 refuses 4096-byte logical sectors');
    await compareWithRaw(image, raw, { block: 2 * M });
  });
});
