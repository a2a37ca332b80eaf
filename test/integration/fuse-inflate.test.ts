/**
 * Compressed qcow2 clusters inflated by the libfuse 3 binding's worker
 * threads: images made by `qemu-img convert -c` (zlib and zstd, clusters of
 * 4 KiB, 64 KiB and 2 MiB) read through a real mount by child processes,
 * byte for byte against `qemu-img convert -O raw`; the binding's counters
 * show the inflation happened in C (so this fails with
 * BLKEXPORT_NATIVE_INFLATE=0); the decompressed-cluster cache stays within
 * its bound; a corrupt stream and one that inflates past the cluster give EIO
 * for that read only, and the export stays up.
 *
 * The export is served by this process, so every read of the mount happens in
 * a child process started asynchronously (the event loop must stay free).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { promisify } from 'node:util';
import { deflateRawSync } from 'node:zlib';
import { openGraph } from '../../src/block/index.js';
import type { HostExtent } from '../../src/block/types.js';
import { fuseExportDriver } from '../../src/export/fuse/driver.js';
import type { FuseExport } from '../../src/export/fuse/export.js';
import { type InflateStats, loadFuse3 } from '../../src/export/fuse/fuse3.js';
import { fsnameFor } from '../../src/export/mount-table.js';
import { cleanupMountsUnder } from '../helpers/mounts.js';
import { needTools, qemuImg, randomBytes, seededRandom } from '../helpers/tools.js';

// Read once by the binding, at its first inflation: small enough that 2 MiB clusters fill it.
process.env.BLKEXPORT_INFLATE_CACHE_MIB = '4';

const K = 1024;
const M = K * K;
const SIZE = 8 * M;
const run = promisify(execFile);

/** Guest data of every kind: compressible, incompressible (stored uncompressed), and zeroes (left out). */
function guestData(seed: number): Buffer {
  const rand = seededRandom(seed);
  const out = Buffer.alloc(SIZE);
  for (let at = 0; at < SIZE; at += 4 * K) {
    const r = rand();
    if (r < 0.15) continue;
    if (r < 0.25) randomBytes(rand, 4 * K).copy(out, at);
    else {
      const word = randomBytes(rand, 16);
      for (let i = 0; i < 4 * K; i += 16) word.copy(out, at + i);
      out[at + Math.floor(rand() * 4 * K)] = Math.floor(rand() * 256);
    }
  }
  return out;
}

function makeImage(dir: string, algorithm: 'zlib' | 'zstd', clusterSize: number, seed: number) {
  const src = join(dir, 'src.raw');
  writeFileSync(src, guestData(seed));
  const img = join(dir, 'disk.qcow2');
  qemuImg(
    'convert',
    '-q',
    '-c',
    '-O',
    'qcow2',
    '-o',
    `cluster_size=${clusterSize},compression_type=${algorithm}`,
    src,
    img,
  );
  const ref = join(dir, 'ref.raw');
  qemuImg('convert', '-q', '-O', 'raw', img, ref);
  return { img, want: readFileSync(ref) };
}

/** A temporary directory, and clean-ups run newest first before it is removed (mounts under it too). */
function scope(t: TestContext) {
  const dir = mkdtempSync(join(tmpdir(), 'blkexport-test-'));
  const cleanups: (() => Promise<void>)[] = [];
  t.after(async () => {
    try {
      for (const fn of cleanups.reverse()) await fn().catch(() => undefined);
    } finally {
      cleanupMountsUnder(dir);
      rmSync(dir, { recursive: true, force: true });
    }
  });
  return { dir, defer: (fn: () => Promise<void>) => cleanups.push(fn) };
}

type Scope = ReturnType<typeof scope>;

async function mountImage({ dir, defer }: Scope, img: string, name = 'mnt'): Promise<FuseExport> {
  const graph = await openGraph(
    [
      { driver: 'file', nodeName: 'prot', filename: img, readOnly: true },
      { driver: 'qcow2', nodeName: 'fmt', file: 'prot', readOnly: true },
    ],
    { allowedRoots: [dir] },
  );
  defer(() => graph.close());
  const mountpoint = join(dir, name);
  writeFileSync(mountpoint, '');
  const exp = (await fuseExportDriver.start(graph.get('fmt')!, {
    id: 'exp0',
    mountpoint,
    writable: false,
    growable: false,
    allowOther: 'off',
    fsname: fsnameFor('mount', process.pid),
  })) as FuseExport;
  defer(() => exp.stop());
  return exp;
}

/** Reads [off, off+len) of `path` with O_DIRECT in a child process, `bs` bytes per read. */
async function directRead(path: string, off: number, len: number, bs: number): Promise<Buffer> {
  const r = await run(
    'dd',
    [`if=${path}`, `bs=${bs}`, `skip=${off / bs}`, `count=${len / bs}`, 'iflag=direct', 'status=none'],
    { encoding: 'buffer', maxBuffer: 2 * SIZE, timeout: 60_000 },
  );
  return r.stdout;
}

/** Like directRead, but the exit status and stderr of a read expected to fail. */
async function failingRead(path: string, off: number, bs: number): Promise<string> {
  try {
    await directRead(path, off, bs, bs);
  } catch (e) {
    return String((e as { stderr?: Buffer }).stderr ?? e);
  }
  return 'no error';
}

function inflateStats(): InflateStats {
  const a = loadFuse3();
  assert.ok(a, 'the libfuse 3 binding is built');
  return a.inflateStats();
}

/** The compressed piece at guest `offset` (its L2 table cached by a read first). */
async function compressedAt(dir: string, img: string, offset: number) {
  const graph = await openGraph(
    [
      { driver: 'file', nodeName: 'prot', filename: img, readOnly: true },
      { driver: 'qcow2', nodeName: 'fmt', file: 'prot', readOnly: true },
    ],
    { allowedRoots: [dir] },
  );
  try {
    const node = graph.get('fmt')!;
    await node.read(offset, Buffer.alloc(4 * K));
    const x: HostExtent | undefined = node.mapHostCached?.(offset, 4 * K)?.[0];
    assert.ok(x && 'compressed' in x, `guest ${offset} is a compressed cluster`);
    return x.compressed;
  } finally {
    await graph.close();
  }
}

describe('compressed clusters inflated by the binding', { concurrency: false }, () => {
  for (const algorithm of ['zlib', 'zstd'] as const) {
    for (const clusterSize of [4 * K, 64 * K, 2 * M]) {
      test(`${algorithm}, ${clusterSize / K} KiB clusters: identical to qemu-img, inflated in C`, async (t) => {
        if (!needTools(t, 'qemu-img', '/dev/fuse', 'dd')) return;
        const sc = scope(t);
        const { dir } = sc;
        const { img, want } = makeImage(dir, algorithm, clusterSize, clusterSize + algorithm.length);
        const exp = await mountImage(sc, img);
        const before = inflateStats();
        // The first pass is served by JavaScript, which teaches the map; the later ones by the workers.
        for (const bs of [M, 4 * K, 64 * K]) {
          const got = await directRead(exp.mountpoint, 0, SIZE, bs);
          assert.ok(got.equals(want), `read with ${bs}-byte requests`);
        }
        const odd = await directRead(exp.mountpoint, 3 * M + 12 * K, 3 * 4 * K, 4 * K);
        assert.ok(odd.equals(want.subarray(3 * M + 12 * K, 3 * M + 24 * K)));
        const after = inflateStats();
        assert.equal(after.enabled, 1, 'BLKEXPORT_NATIVE_INFLATE is not 0');
        assert.equal(after.failed, before.failed, 'every cluster inflated');
        const inC = after.inflated - before.inflated + after.cacheHits - before.cacheHits;
        if (clusterSize < 64 * K) {
          // Clusters smaller than a granule are left to JavaScript.
          assert.equal(after.inflated, before.inflated);
        } else {
          assert.ok(after.inflated > before.inflated, 'clusters were inflated in C');
          assert.ok(inC > 0);
          assert.ok(exp.stats.reads > 0);
        }
        assert.equal(after.cacheLimit, 4 * M);
        assert.ok(after.cacheBytes <= after.cacheLimit, `cache within its bound (${after.cacheBytes})`);
        if (clusterSize === 2 * M) {
          assert.ok(after.cacheHits > before.cacheHits, 'granules of a 2 MiB cluster hit the cache');
          assert.ok(after.cacheEntries <= 2);
        }
      });
    }
  }

  test('a corrupt stream and an oversized one give EIO for their reads; the export stays up', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse', 'dd')) return;
    const sc = scope(t);
    const { dir } = sc;
    const { img, want } = makeImage(dir, 'zlib', 64 * K, 77);
    // Two compressed clusters in the second half, never read by JavaScript (whose cache would serve them).
    const offsets: number[] = [];
    for (let off = SIZE / 2; offsets.length < 2; off += 64 * K) {
      const x = await compressedAt(dir, img, off).catch(() => undefined);
      if (x && x.clen > 200) offsets.push(off);
    }
    const [bad, big] = offsets as [number, number];
    const badAt = await compressedAt(dir, img, bad);
    const bigAt = await compressedAt(dir, img, big);
    const exp = await mountImage(sc, img);
    // A read served by JavaScript installs the mapping of the 8 MiB after it (the L2 table is cached).
    assert.ok((await directRead(exp.mountpoint, 0, M, M)).equals(want.subarray(0, M)));
    const fd = openSync(img, 'r+');
    try {
      writeSync(fd, Buffer.alloc(64, 0xa5), 0, 64, badAt.host + 8);
      const stream = deflateRawSync(Buffer.alloc(128 * K, 7), { windowBits: 12 });
      assert.ok(stream.length <= bigAt.clen);
      writeSync(fd, stream, 0, stream.length, bigAt.host);
    } finally {
      closeSync(fd);
    }
    const before = inflateStats();
    assert.match(await failingRead(exp.mountpoint, bad, 4 * K), /Input\/output error/);
    assert.equal(inflateStats().failed, before.failed + 1, 'the workers refused the corrupt stream');
    // The corruption JavaScript then found stops this export's fast path (its map is forgotten), so the
    // oversized stream gets a fresh export, taught by a read of the first MiB like the first.
    const exp2 = await mountImage(sc, img, 'mnt2');
    assert.ok((await directRead(exp2.mountpoint, 0, M, M)).equals(want.subarray(0, M)));
    assert.match(await failingRead(exp2.mountpoint, big, 4 * K), /Input\/output error/);
    assert.equal(inflateStats().failed, before.failed + 2, 'the workers refused the oversized stream');
    // The rest still reads (JavaScript serves it: the node is marked corrupt).
    const other = M;
    assert.ok(
      (await directRead(exp.mountpoint, other, 64 * K, 4 * K)).equals(want.subarray(other, other + 64 * K)),
    );
  });
});
