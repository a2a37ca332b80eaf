/**
 * The qcow2 read path against QEMU: for every image of the matrix
 * (docs/qcow2.md lists the options), every byte read through the block layer equals
 * `qemu-img convert -O raw`, thousands of random unaligned reads (many at
 * once, through a tiny L2 cache) equal the same ranges, and `info -o json`
 * agrees with `qemu-img info --output=json`.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/index.js';
import { imageInfoJson } from '../../src/cli/commands/info.js';
import { missingTools, qemuImg, randomBytes, run, runOk, seededRandom, tempDir } from '../helpers/tools.js';
import { applyWrites, convertToRaw, createQcow2, K, M, scatteredWrites, type Write } from './images.js';

interface Built {
  image: string;
  /** Directories backing/data files live in (default: the test dir). */
  roots?: string[];
  /** Where QEMU must run for relative names in the image to resolve (QEMU 7.2 resolves a data file against its cwd). */
  cwd?: string;
}

interface Case {
  name: string;
  cluster: number;
  build(dir: string): Built;
}

const l2cov = (cluster: number, ext = false) => (cluster / (ext ? 16 : 8)) * cluster;

function simple(
  name: string,
  size: number,
  opts: Record<string, string>,
  cluster: number,
  seed: number,
  extra?: (dir: string, img: string) => void,
): Case {
  return {
    name,
    cluster,
    build(dir) {
      const img = createQcow2(join(dir, 'img.qcow2'), size, opts);
      applyWrites(
        dir,
        img,
        'qcow2',
        scatteredWrites(seed, size, cluster, l2cov(cluster, opts.extended_l2 === 'on')),
        seed,
      );
      extra?.(dir, img);
      return { image: img };
    },
  };
}

/** A raw file with random data at scattered places, some zero runs and some very compressible runs. */
function sparseSource(dir: string, size: number, seed: number): string {
  const path = join(dir, 'src.raw');
  const fd = openSync(path, 'w');
  const rand = seededRandom(seed);
  for (const w of scatteredWrites(seed, size, 64 * K, 512 * M, 16)) {
    const data =
      rand() < 0.3 ? Buffer.alloc(w.len, 0x41 + Math.floor(rand() * 20)) : randomBytes(rand, w.len);
    for (let done = 0; done < data.length; )
      done += writeSync(fd, data, done, data.length - done, w.off + done);
  }
  closeSync(fd);
  run('truncate', ['-s', String(size), path]);
  return path;
}

function writeAt(path: string, data: Buffer, off: number): void {
  const fd = openSync(path, 'r+');
  try {
    for (let done = 0; done < data.length; )
      done += writeSync(fd, data, done, data.length - done, off + done);
  } finally {
    closeSync(fd);
  }
}

const CASES: Case[] = [
  simple(
    'compat 0.10, 64 KiB clusters, across an L2-table boundary',
    520 * M,
    { compat: '0.10', cluster_size: '64k' },
    64 * K,
    1,
  ),
  simple('compat 1.1, 512 B clusters', 6 * M, { cluster_size: '512' }, 512, 2),
  simple('4 KiB clusters, refcount_bits=1', 12 * M, { cluster_size: '4k', refcount_bits: '1' }, 4 * K, 3),
  simple('2 MiB clusters, refcount_bits=64', 24 * M, { cluster_size: '2M', refcount_bits: '64' }, 2 * M, 4),
  simple('lazy refcounts (clean)', 16 * M, { lazy_refcounts: 'on' }, 64 * K, 5),
  {
    name: 'lazy refcounts, dirty (qemu-io abort)',
    cluster: 64 * K,
    build(dir) {
      const img = createQcow2(join(dir, 'img.qcow2'), 16 * M, { lazy_refcounts: 'on' });
      applyWrites(dir, img, 'qcow2', scatteredWrites(6, 16 * M, 64 * K, l2cov(64 * K)), 6);
      const f = join(dir, 'dirty.bin');
      writeFileSync(f, randomBytes(seededRandom(60), 200 * K));
      run('qemu-io', [
        '-f',
        'qcow2',
        '-c',
        `write -s ${f} 3000000 ${200 * K}`,
        '-c',
        'flush',
        '-c',
        'abort',
        img,
      ]);
      return { image: img };
    },
  },
  {
    name: 'extended L2, partial subcluster writes over a backing file',
    cluster: 64 * K,
    build(dir) {
      const base = createQcow2(join(dir, 'base.qcow2'), 300 * M, {});
      applyWrites(
        dir,
        base,
        'qcow2',
        [{ off: 0, len: 300 * M, kind: 'zero' }, ...scatteredWrites(70, 300 * M, 64 * K, 256 * M, 20)],
        70,
      );
      applyWrites(dir, base, 'qcow2', bigRuns(71, 300 * M), 71);
      const img = createQcow2(join(dir, 'img.qcow2'), 300 * M, { extended_l2: 'on' }, [
        'base.qcow2',
        'qcow2',
      ]);
      const small: Write[] = [];
      const r = seededRandom(72);
      for (let i = 0; i < 40; i++)
        small.push({ off: Math.floor(r() * 300 * M), len: 1 + Math.floor(r() * 5000), kind: 'data' });
      small.push({ off: 256 * M - 3000, len: 6000, kind: 'data' });
      small.push({ off: 8 * M + 2048, len: 2048, kind: 'zero' });
      applyWrites(dir, img, 'qcow2', [...small, ...scatteredWrites(73, 300 * M, 64 * K, 256 * M)], 73);
      return { image: img };
    },
  },
  simple(
    'extended L2, 32 KiB clusters, zero subclusters',
    20 * M,
    { extended_l2: 'on', cluster_size: '32k' },
    32 * K,
    8,
    (dir, img) =>
      applyWrites(
        dir,
        img,
        'qcow2',
        [
          { off: 1 * M + 1024, len: 3000, kind: 'zero' },
          { off: 5 * M, len: 64 * K, kind: 'zero-unmap' },
          { off: 20 * M - 40 * K, len: 7 * K, kind: 'discard' },
        ],
        80,
      ),
  ),
  {
    name: 'zlib compressed (qemu-img convert -c), 64 KiB clusters',
    cluster: 64 * K,
    build(dir) {
      const src = sparseSource(dir, 40 * M, 9);
      const img = join(dir, 'img.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', src, img);
      return { image: img };
    },
  },
  {
    name: 'zlib compressed, 4 KiB clusters, then partial overwrites',
    cluster: 4 * K,
    build(dir) {
      const src = sparseSource(dir, 12 * M, 10);
      const img = join(dir, 'img.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', src, img);
      applyWrites(dir, img, 'qcow2', scatteredWrites(100, 12 * M, 4 * K, l2cov(4 * K), 6), 100);
      return { image: img };
    },
  },
  {
    name: 'zlib compressed, 512 B clusters (descriptor with a 1-bit sector count)',
    cluster: 512,
    build(dir) {
      const src = sparseSource(dir, 3 * M, 25);
      const img = join(dir, 'img.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=512', src, img);
      return { image: img };
    },
  },
  {
    name: 'zlib compressed, 2 MiB clusters',
    cluster: 2 * M,
    build(dir) {
      const src = sparseSource(dir, 24 * M, 26);
      const img = join(dir, 'img.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=2M', src, img);
      return { image: img };
    },
  },
  {
    name: 'zstd compressed (qemu-img convert -c)',
    cluster: 64 * K,
    build(dir) {
      const src = sparseSource(dir, 40 * M, 11);
      const img = join(dir, 'img.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', src, img);
      return { image: img };
    },
  },
  {
    name: 'compressed writes with qemu-io write -c, 2 MiB clusters, zstd',
    cluster: 2 * M,
    build(dir) {
      const img = createQcow2(join(dir, 'img.qcow2'), 16 * M, {
        cluster_size: '2M',
        compression_type: 'zstd',
      });
      applyWrites(
        dir,
        img,
        'qcow2',
        [
          { off: 0, len: 2 * M, kind: 'compressed' },
          { off: 6 * M, len: 2 * M, kind: 'compressed' },
          { off: 14 * M, len: 2 * M, kind: 'compressed' },
          { off: 6 * M + 5000, len: 100, kind: 'data' },
        ],
        12,
      );
      return { image: img };
    },
  },
  simple('zero and discarded ranges (qemu-io)', 24 * M, {}, 64 * K, 13, (dir, img) =>
    applyWrites(
      dir,
      img,
      'qcow2',
      [
        { off: 0, len: 64 * K, kind: 'zero' },
        { off: 3 * M + 512, len: 200 * K, kind: 'zero' },
        { off: 7 * M, len: 1 * M, kind: 'zero-unmap' },
        { off: 11 * M, len: 3 * M, kind: 'discard' },
        { off: 24 * M - 64 * K, len: 64 * K, kind: 'discard' },
      ],
      130,
    ),
  ),
  {
    name: '3-deep backing chain (raw <- qcow2 <- qcow2) growing in size, zero clusters hiding backing data',
    cluster: 64 * K,
    build(dir) {
      const base = join(dir, 'base.raw');
      writeFileSync(base, Buffer.alloc(0));
      run('truncate', ['-s', String(8 * M + 1000), base]);
      for (const w of scatteredWrites(14, 8 * M + 1000, 64 * K, 1 * M, 20))
        writeAt(base, randomBytes(seededRandom(w.off), w.len), w.off);
      const mid = createQcow2(join(dir, 'mid.qcow2'), 12 * M, { cluster_size: '4k' }, ['base.raw', 'raw']);
      applyWrites(dir, mid, 'qcow2', scatteredWrites(15, 12 * M, 4 * K, l2cov(4 * K)), 15);
      const top = createQcow2(join(dir, 'top.qcow2'), 16 * M, {}, ['mid.qcow2', 'qcow2']);
      applyWrites(
        dir,
        top,
        'qcow2',
        [
          ...scatteredWrites(16, 16 * M, 64 * K, l2cov(64 * K)),
          { off: 1 * M, len: 256 * K, kind: 'zero' },
          { off: 4 * M, len: 128 * K, kind: 'zero-unmap' },
        ],
        16,
      );
      return { image: top };
    },
  },
  {
    name: 'compat 0.10 over a qcow2 backing file',
    cluster: 64 * K,
    build(dir) {
      const base = createQcow2(join(dir, 'base.qcow2'), 10 * M, { compat: '0.10' });
      applyWrites(dir, base, 'qcow2', bigRuns(17, 10 * M), 17);
      const img = createQcow2(join(dir, 'img.qcow2'), 10 * M, { compat: '0.10' }, ['base.qcow2', 'qcow2']);
      applyWrites(
        dir,
        img,
        'qcow2',
        [...scatteredWrites(18, 10 * M, 64 * K, l2cov(64 * K)), { off: 2 * M, len: 100 * K, kind: 'zero' }],
        18,
      );
      return { image: img };
    },
  },
  simple('internal snapshot followed by overwrites', 16 * M, {}, 64 * K, 19, (dir, img) => {
    qemuImg('snapshot', '-c', 'snap1', img);
    applyWrites(dir, img, 'qcow2', scatteredWrites(190, 16 * M, 64 * K, l2cov(64 * K)), 190);
    qemuImg('snapshot', '-c', 'second snapshot', img);
    applyWrites(
      dir,
      img,
      'qcow2',
      [...scatteredWrites(191, 16 * M, 64 * K, l2cov(64 * K), 4), { off: 0, len: 8 * K, kind: 'zero' }],
      191,
    );
  }),
  simple('preallocation=metadata', 16 * M, { preallocation: 'metadata' }, 64 * K, 20),
  simple(
    'preallocation=full, 4 KiB clusters',
    8 * M,
    { preallocation: 'full', cluster_size: '4k' },
    4 * K,
    21,
  ),
  simple('bitmaps', 16 * M, {}, 64 * K, 22, (dir, img) => {
    qemuImg('bitmap', '--add', img, 'b0');
    applyWrites(dir, img, 'qcow2', scatteredWrites(220, 16 * M, 64 * K, l2cov(64 * K), 4), 220);
  }),
  {
    name: 'external data file',
    cluster: 64 * K,
    build(dir) {
      const img = createQcow2(join(dir, 'img.qcow2'), 16 * M, { data_file: join(dir, 'img.data') });
      applyWrites(dir, img, 'qcow2', scatteredWrites(23, 16 * M, 64 * K, l2cov(64 * K)), 23);
      return { image: img };
    },
  },
  {
    name: 'external data file, data_file_raw=on, 4 KiB clusters',
    cluster: 4 * K,
    build(dir) {
      // A relative data file name: QEMU 7.2 resolves it against its cwd, blkexport next to the image.
      runOk(
        'qemu-img',
        [
          'create',
          '-q',
          '-f',
          'qcow2',
          '-o',
          'data_file=img.data,data_file_raw=on,cluster_size=4k',
          'img.qcow2',
          `${9 * M}`,
        ],
        { cwd: dir },
      );
      const img = join(dir, 'img.qcow2');
      const writes: Write[] = [
        ...scatteredWrites(24, 9 * M, 4 * K, l2cov(4 * K)),
        { off: 100 * K, len: 10 * K, kind: 'zero' },
      ];
      applyWrites(dir, img, 'qcow2', writes, 24, dir);
      return { image: img, cwd: dir };
    },
  },
];

/** A few long runs (to make a backing file substantially allocated). */
function bigRuns(seed: number, size: number): Write[] {
  const r = seededRandom(seed);
  const out: Write[] = [];
  for (let i = 0; i < 6; i++)
    out.push({ off: Math.floor(r() * (size - 256 * K)), len: 256 * K, kind: 'data' });
  return out;
}

async function compareEverything(
  image: string,
  raw: string,
  cluster: number,
  roots: string[],
): Promise<void> {
  const img = await openImage({ filename: image, readOnly: true, allowedRoots: roots });
  const fd = openSync(raw, 'r');
  try {
    const size = img.node.length();
    const chunk = 4 * M;
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
  } finally {
    await img.close();
  }
  // Random unaligned reads, 16 at a time, through an L2 cache of two tables (evictions, shared loads).
  const small = await openImage({
    filename: image,
    readOnly: true,
    allowedRoots: roots,
    l2CacheBytes: 2 * cluster,
  });
  try {
    const size = small.node.length();
    const rand = seededRandom(cluster + size);
    // 2000 reads; 480 with 2 MiB clusters, whose reads are up to 4 MiB and (compressed) inflate whole clusters.
    const batches = cluster >= 2 * M ? 30 : 125;
    for (let batch = 0; batch < batches; batch++) {
      const jobs: Promise<void>[] = [];
      for (let j = 0; j < 16; j++) {
        const pick = rand();
        const len =
          1 + Math.floor(pick < 0.5 ? rand() * 4096 : pick < 0.9 ? rand() * 2 * cluster : rand() * 300 * K);
        const off = Math.floor(rand() * Math.max(1, size - len));
        const n = Math.min(len, size - off);
        jobs.push(
          (async () => {
            const got = Buffer.alloc(n);
            await small.node.read(off, got);
            const want = Buffer.alloc(n);
            readSync(fd2(raw), want, 0, n, off);
            assert.ok(got.equals(want), `random read ${off}+${n} differs`);
          })(),
        );
      }
      await Promise.all(jobs);
    }
  } finally {
    await small.close();
    closeSync(fd);
    closeFd2();
  }
}

let cachedFd: { path: string; fd: number } | undefined;
function fd2(path: string): number {
  if (cachedFd?.path !== path) {
    closeFd2();
    cachedFd = { path, fd: openSync(path, 'r') };
  }
  return cachedFd.fd;
}
function closeFd2(): void {
  if (cachedFd) closeSync(cachedFd.fd);
  cachedFd = undefined;
}

const INFO_FIELDS = [
  'virtual-size',
  'filename',
  'format',
  'actual-size',
  'cluster-size',
  'dirty-flag',
  'backing-filename',
  'full-backing-filename',
  'backing-filename-format',
  'snapshots',
] as const;
const SPECIFIC_FIELDS = [
  'compat',
  'compression-type',
  'lazy-refcounts',
  'refcount-bits',
  'corrupt',
  'extended-l2',
];

async function compareInfo(image: string, cwd?: string): Promise<void> {
  const ours = (await imageInfoJson(image))[0]!;
  const theirs = JSON.parse(runOk('qemu-img', ['info', '--output=json', '-U', image], { cwd })) as Record<
    string,
    unknown
  >;
  for (const f of INFO_FIELDS) assert.deepEqual(ours[f], theirs[f], `info field ${f}`);
  const od = (ours['format-specific'] as { data: Record<string, unknown> }).data;
  const td = (theirs['format-specific'] as { data: Record<string, unknown> }).data;
  for (const f of SPECIFIC_FIELDS) assert.deepEqual(od[f], td[f], `format-specific field ${f}`);
}

describe('qcow2 images made by qemu-img read byte-identical to qemu-img convert -O raw', () => {
  const missing = missingTools('qemu-img', 'qemu-io');
  for (const c of CASES) {
    test(c.name, {
      skip: missing.length ? `missing: ${missing.join(', ')}` : false,
      timeout: 60_000,
    }, async (t) => {
      const dir = tempDir(t);
      const built = c.build(dir);
      const raw = convertToRaw(built.image, join(dir, 'oracle.raw'), built.cwd);
      const check = run('qemu-img', ['check', built.image], { cwd: built.cwd });
      assert.ok(
        check.status === 0 || check.status === 3 || /dirty/i.test(c.name),
        `qemu-img check: ${check.stdout}`,
      );
      await compareEverything(built.image, raw, c.cluster, built.roots ?? [dir]);
      await compareInfo(built.image, built.cwd);
    });
  }
});
