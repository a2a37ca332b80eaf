/**
 * The qcow2 write path against the oracle: seeded workloads (1 B – 1 MiB,
 * unaligned, overlapping, write-zeroes, discards, flushes) through the block
 * layer on images made by qemu-img, then `qemu-img check` must be clean (no
 * leaks, no corruptions) and `qemu-img compare` must find the image equal to
 * the reference bytes.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { stateOf } from '../../src/block/format/qcow2/inspect.js';
import { openImage } from '../../src/block/open-image.js';
import { needTools, qemuImg, qemuIo, randomBytes, run, seededRandom, tempDir } from '../helpers/tools.js';
import { convertToRaw, createQcow2, K, M } from './images.js';
import { runWorkload } from './qcow2-write-workload.js';

const code = (e: unknown) => (e as { code?: string }).code;

/** Asserts qemu-img check exits 0 and compare finds `img` equal to `ref`. */
function assertClean(dir: string, img: string, ref: Buffer, what: string): void {
  const c = run('qemu-img', ['check', img]);
  assert.equal(c.status, 0, `${what}: qemu-img check exited ${c.status}: ${c.stdout}${c.stderr}`);
  const refFile = join(dir, 'ref.raw');
  writeFileSync(refFile, ref);
  const cmp = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, refFile]);
  assert.equal(cmp.status, 0, `${what}: qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
}

/** Opens `img` writable, runs the workload, checks reads, closes, checks with qemu-img. */
async function workloadOn(
  dir: string,
  img: string,
  seed: number,
  ops: number,
  ref?: Buffer,
  l2CacheBytes?: number,
): Promise<Buffer> {
  const expected = ref ?? readFileSync(convertToRaw(img, join(dir, 'start.raw')));
  const o = await openImage({ filename: img, readOnly: false, l2CacheBytes });
  try {
    assert.equal(o.node.capabilities().write, true);
    await runWorkload(o.node, expected, seed, { ops, zeroes: true, discards: true });
    const back = Buffer.alloc(expected.length);
    await o.node.read(0, back);
    assert.ok(back.equals(expected), `seed ${seed}: reads after the workload differ from the reference`);
  } finally {
    await o.close();
  }
  assertClean(dir, img, expected, `${img} seed ${seed}`);
  return expected;
}

const FRESH: [string, Record<string, string>][] = [
  ['512 B clusters', { cluster_size: '512' }],
  ['64 KiB clusters', {}],
  ['2 MiB clusters', { cluster_size: '2M' }],
  ['extended L2, 64 KiB', { extended_l2: 'on' }],
  ['refcount bits 1 (block and table growth)', { cluster_size: '512', refcount_bits: '1' }],
  ['refcount bits 64 (block and table growth)', { cluster_size: '512', refcount_bits: '64' }],
  ['version 2', { compat: '0.10', cluster_size: '4096' }],
  ['lazy refcounts', { lazy_refcounts: 'on' }],
];

describe('qcow2 write path', { concurrency: false }, () => {
  for (const [name, opts] of FRESH) {
    test(`fresh image: ${name}`, async (t) => {
      if (!needTools(t, 'qemu-img')) return;
      const dir = tempDir(t);
      const img = createQcow2(join(dir, 'img.qcow2'), 6 * M + 3 * 512, opts);
      // A two-table L2 cache for small clusters: tables are evicted and reloaded between writes.
      const cache = opts.cluster_size === '512' ? 1024 : undefined;
      const ref = await workloadOn(dir, img, 11, 90, Buffer.alloc(6 * M + 3 * 512), cache);
      // A second session on the same image: reopened tables, refcounts and free space.
      await workloadOn(dir, img, 12, 40, ref);
    });
  }

  test('overwriting allocated clusters is one pwrite and a flush of it writes no metadata', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'fast.qcow2'), 4 * M, {});
    const o = await openImage({ filename: img, readOnly: false });
    try {
      await o.node.write(0, Buffer.alloc(M, 1)); // allocates 16 clusters, contiguous
      await o.node.flush();
      const file = stateOf(o.node).file;
      const writes: [number, number][] = [];
      const write = file.write.bind(file);
      file.write = (off: number, buf: Buffer) => {
        writes.push([off, buf.length]);
        return write(off, buf);
      };
      await o.node.write(1000, Buffer.alloc(200000, 2)); // spans four clusters
      assert.equal(writes.length, 1, `one pwrite, got ${JSON.stringify(writes)}`);
      await o.node.flush();
      assert.equal(writes.length, 1, 'the flush wrote no metadata');
      file.write = write;
    } finally {
      await o.close();
    }
    assert.equal(run('qemu-img', ['check', img]).status, 0);
  });

  test('an allocating write resolves with its metadata in the file; concurrent ones share the write-back', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'group.qcow2'), 64 * M, {});
    const ref = Buffer.alloc(64 * M);
    const o = await openImage({ filename: img, readOnly: false });
    try {
      const file = stateOf(o.node).file;
      const write = file.write.bind(file);
      const flush = file.flush.bind(file);
      let writes = 0;
      let syncs = 0;
      file.write = (off: number, buf: Buffer) => {
        writes++;
        return write(off, buf);
      };
      file.flush = () => {
        syncs++;
        return flush();
      };
      // 32 writes in flight, each allocating its own cluster (and the first the L2 table).
      const jobs: Promise<void>[] = [];
      for (let i = 0; i < 32; i++) {
        const data = randomBytes(seededRandom(100 + i), 4096);
        data.copy(ref, i * 2 * M + 1000);
        jobs.push(o.node.write(i * 2 * M + 1000, data));
      }
      await Promise.all(jobs);
      file.write = write;
      file.flush = flush;
      // One write-back per group, not per write: refcounts counted ahead, L2 and L1 written once or twice.
      assert.ok(writes - 32 <= 8, `${writes - 32} metadata writes for 32 allocating writes`);
      assert.ok(syncs <= 2, `${syncs} syncs for 32 allocating writes`);
      // No flush, no close: the file already holds every acknowledged write (and leaks only:
      // the clusters counted ahead).
      const c = run('qemu-img', ['check', '-U', img]);
      assert.ok(c.status === 0 || c.status === 3, `qemu-img check -U: ${c.status}: ${c.stdout}${c.stderr}`);
      const out = join(dir, 'open.raw');
      assert.equal(run('qemu-img', ['convert', '-U', '-O', 'raw', img, out]).status, 0);
      assert.ok(readFileSync(out).equals(ref), 'the open image reads back what was acknowledged');
    } finally {
      await o.close();
    }
    // A clean close gives the clusters counted ahead back: no leaks.
    assertClean(dir, img, ref, 'after close');
  });

  test('lazy refcounts: a write resolves once the dirty bit is synced and its L2 entry written; refcount blocks wait for the flush', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'lazy.qcow2'), 64 * M, { lazy_refcounts: 'on' });
    const ref = Buffer.alloc(64 * M);
    const o = await openImage({ filename: img, readOnly: false });
    try {
      const s = stateOf(o.node);
      const block = s.refcounts.blockOffset(0);
      const cs = s.header.clusterSize;
      const file = s.file;
      const write = file.write.bind(file);
      const blockWrites: number[] = [];
      file.write = (off: number, buf: Buffer) => {
        if (off < block + cs && off + buf.length > block) blockWrites.push(off);
        return write(off, buf);
      };
      const data = randomBytes(seededRandom(7), 100 * K);
      data.copy(ref, 5 * M + 333);
      await o.node.write(5 * M + 333, data);
      assert.equal(readFileSync(img).readBigUInt64BE(72) & 1n, 1n, 'the dirty bit is set in the file');
      assert.deepEqual(blockWrites, [], 'no refcount block written before the flush');
      const out = join(dir, 'open.raw');
      assert.equal(run('qemu-img', ['convert', '-U', '-O', 'raw', img, out]).status, 0);
      assert.ok(readFileSync(out).equals(ref), 'the open image reads back what was acknowledged');
      await o.node.flush();
      assert.ok(blockWrites.length > 0, 'the flush writes the refcount block');
      file.write = write;
    } finally {
      await o.close();
    }
    assert.equal(readFileSync(img).readBigUInt64BE(72) & 1n, 0n, 'a clean close clears the dirty bit');
    assertClean(dir, img, ref, 'after close');
  });

  test('backing chain: raw ← qcow2 ← qcow2 (v3 and extended L2 tops)', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const base = join(dir, 'base.raw');
    writeFileSync(base, randomBytes(seededRandom(5), 5 * M));
    const mid = createQcow2(join(dir, 'mid.qcow2'), 6 * M, {}, [base, 'raw']);
    writeFileSync(join(dir, 'mid.bin'), randomBytes(seededRandom(6), 300 * K));
    qemuIo(
      '-f',
      'qcow2',
      '-c',
      `write -s ${join(dir, 'mid.bin')} 100000 ${300 * K}`,
      '-c',
      'write -z 2M 128k',
      mid,
    );
    const top = createQcow2(join(dir, 'top.qcow2'), 6 * M, {}, [mid, 'qcow2']);
    await workloadOn(dir, top, 21, 80);
    const ext = createQcow2(join(dir, 'ext.qcow2'), 6 * M, { extended_l2: 'on', cluster_size: '32k' }, [
      mid,
      'qcow2',
    ]);
    await workloadOn(dir, ext, 22, 80);
    const v2 = createQcow2(join(dir, 'v2.qcow2'), 6 * M, { compat: '0.10' }, [mid, 'qcow2']);
    await workloadOn(dir, v2, 23, 60);
  });

  test('compressed image: writes into compressed clusters move them', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const raw = join(dir, 'src.raw');
    const data = Buffer.alloc(4 * M);
    randomBytes(seededRandom(7), 2 * M).copy(data, 0);
    data.fill('compressible text ', 2 * M);
    writeFileSync(raw, data);
    for (const ct of ['zlib', 'zstd']) {
      const img = join(dir, `c-${ct}.qcow2`);
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', `compression_type=${ct},cluster_size=16384`, raw, img);
      await workloadOn(dir, img, 31, 70);
    }
  });

  test('internal snapshots: shared clusters and L2 tables are copied; snapshot -a restores the old bytes', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'snap.qcow2'), 4 * M, { cluster_size: '4096' });
    writeFileSync(join(dir, 'd.bin'), randomBytes(seededRandom(8), 3 * M));
    qemuIo('-f', 'qcow2', '-c', `write -s ${join(dir, 'd.bin')} 12345 ${3 * M}`, img);
    qemuImg('snapshot', '-c', 'before', img);
    const before = readFileSync(convertToRaw(img, join(dir, 'before.raw')));
    await workloadOn(dir, img, 41, 80);
    qemuImg('snapshot', '-c', 'second', img);
    await workloadOn(dir, img, 42, 40);
    qemuImg('snapshot', '-a', 'before', img);
    assert.equal(run('qemu-img', ['check', img]).status, 0);
    const after = readFileSync(convertToRaw(img, join(dir, 'after.raw')));
    assert.ok(after.equals(before), 'snapshot -a did not restore the snapshot contents');
  });

  test('bitmaps: marked in use before the first write, their clusters never leak', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'bm.qcow2'), 4 * M, {});
    qemuIo('-f', 'qcow2', '-c', 'write -P 3 0 300k', img);
    qemuImg('bitmap', '--add', img, 'b0');
    qemuImg('bitmap', '--add', '-g', '1M', img, 'b1');
    await workloadOn(dir, img, 61, 50);
    const info = JSON.parse(qemuImg('info', '--output=json', img)) as {
      'format-specific': { data: { bitmaps: { flags: string[] }[] } };
    };
    for (const b of info['format-specific'].data.bitmaps) assert.ok(b.flags.includes('in-use'));
  });

  test('resize: grow with L1 growth, shrink, grow again reads zeroes', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'r.qcow2'), 1 * M, { cluster_size: '512' });
    const o = await openImage({ filename: img, readOnly: false });
    const ref = Buffer.alloc(40 * M);
    try {
      await runWorkload(o.node, ref.subarray(0, M), 51, { ops: 30, maxLen: 64 * K });
      await o.node.truncate(40 * M); // 512 B clusters: 32 KiB per L2 table, the L1 grows from 32 to 1280 entries
      await runWorkload(o.node, ref, 52, { ops: 40, maxLen: 256 * K });
      await o.node.truncate(10 * M + 777);
      ref.fill(0, 10 * M + 777);
      await o.node.truncate(40 * M);
    } finally {
      await o.close();
    }
    const info = JSON.parse(qemuImg('info', '--output=json', img)) as { 'virtual-size': number };
    assert.equal(info['virtual-size'], 40 * M);
    assertClean(dir, img, ref, 'resized');
  });

  test('images that are never written: corrupt flag, a write aimed at metadata; snapshots block shrinking', async (t) => {
    if (!needTools(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = createQcow2(join(dir, 'c.qcow2'), 1 * M, {});
    const b = readFileSync(img);
    b.writeBigUInt64BE(b.readBigUInt64BE(72) | 2n, 72);
    writeFileSync(img, b);
    await assert.rejects(openImage({ filename: img, readOnly: false }), (e) => code(e) === 'IMAGE_CORRUPT');
    // An L2 entry that points at the L1 table: the write is refused before it lands, the image flagged corrupt.
    const bad = createQcow2(join(dir, 'bad.qcow2'), 1 * M, {});
    qemuIo('-f', 'qcow2', '-c', 'write -P 1 0 64k', bad);
    const raw = readFileSync(bad);
    const l1 = Number(raw.readBigUInt64BE(40));
    const l2 = Number(raw.readBigUInt64BE(l1) & 0xfffffffffe00n);
    raw.writeBigUInt64BE((1n << 63n) | BigInt(l1), l2);
    writeFileSync(bad, raw);
    const w = await openImage({ filename: bad, readOnly: false });
    try {
      await assert.rejects(w.node.write(100, Buffer.alloc(10, 2)), (e) => code(e) === 'IMAGE_CORRUPT');
      assert.equal(w.node.capabilities().write, false);
      await assert.rejects(w.node.write(70000, Buffer.alloc(10, 2)), (e) => code(e) === 'IMAGE_CORRUPT');
    } finally {
      await w.close();
    }
    assert.equal(readFileSync(bad).readBigUInt64BE(l1), raw.readBigUInt64BE(l1), 'the L1 table is untouched');
    const info = JSON.parse(qemuImg('info', '--output=json', bad)) as {
      'format-specific': { data: { corrupt: boolean } };
    };
    assert.equal(info['format-specific'].data.corrupt, true);
    await assert.rejects(openImage({ filename: bad, readOnly: false }), (e) => code(e) === 'IMAGE_CORRUPT');

    const s = createQcow2(join(dir, 's.qcow2'), 1 * M, {});
    qemuImg('snapshot', '-c', 'x', s);
    const o = await openImage({ filename: s, readOnly: false });
    try {
      await assert.rejects(o.node.truncate(512 * K), (e) => code(e) === 'NOT_SUPPORTED');
    } finally {
      await o.close();
    }
  });
});
