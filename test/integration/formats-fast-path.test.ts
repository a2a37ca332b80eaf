/**
 * The FUSE read fast path on the read-only formats (vmdk, vhdx, vpc, vdi,
 * qed): images made by qemu-img from one guest that mixes allocated,
 * partly written and unallocated regions (and, for vmdk streamOptimized,
 * compressed grains; for qed and vmdk, backing files), served by this
 * process through a real mount. A child process reads the whole export
 * once (the export learns the host mapping), then reads random ranges with
 * O_DIRECT: every byte equals `qemu-img convert -O raw`, and the binding's
 * worker threads served nearly all of those reads themselves (streamOptimized
 * grains inflated by the workers, never read as plain bytes).
 *
 * Every read of the mount happens in a child process started asynchronously
 * (the event loop that serves the mount must stay free).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { promisify } from 'node:util';
import { openGraph } from '../../src/block/index.js';
import { fuseExportDriver } from '../../src/export/fuse/driver.js';
import type { FuseExport } from '../../src/export/fuse/export.js';
import { loadFuse3 } from '../../src/export/fuse/fuse3.js';
import { fsnameFor } from '../../src/export/mount-table.js';
import { cleanupMountsUnder } from '../helpers/mounts.js';
import { needTools, qemuImg, qemuIo, randomBytes, seededRandom, tempDir } from '../helpers/tools.js';

const K = 1024;
const M = K * K;
const SIZE = 12 * M;
/** The unit of the guest's layout: one vmdk grain, one qed cluster, one fast-path granule. */
const UNIT = 64 * K;
const READS = 300;
const CLIENT = new URL('./direct-read-client.py', import.meta.url).pathname;
const execFileP = promisify(execFile);

/**
 * The guest: per 64 KiB unit random data, a repeated word (compressible),
 * one random 4 KiB block in zeroes, or zeroes; and 4 MiB of zeroes in the
 * middle, so that every format has unallocated blocks (vpc's are 2 MiB).
 */
function guestData(seed: number): Buffer {
  const rand = seededRandom(seed);
  const out = Buffer.alloc(SIZE);
  for (let at = 0; at < SIZE; at += UNIT) {
    if (at >= 4 * M && at < 8 * M) continue;
    const r = rand();
    if (r < 0.35) randomBytes(rand, UNIT).copy(out, at);
    else if (r < 0.5) {
      const word = randomBytes(rand, 16);
      for (let i = 0; i < UNIT; i += 16) word.copy(out, at + i);
    } else if (r < 0.6) randomBytes(rand, 4 * K).copy(out, at + Math.floor(rand() * 16) * 4 * K);
  }
  return out;
}

interface Case {
  name: string;
  format: string;
  /** qemu-img convert -o options (made from the guest), or a function that makes the image. */
  make: string | ((dir: string, src: string, img: string) => void);
  /** Grains are compressed: the workers inflate them. */
  compressed?: boolean;
}

/** A qed (or vmdk) over a base of the guest, with a few ranges written into the top by qemu-io. */
function overlay(baseFormat: string, format: string) {
  return (dir: string, src: string, img: string) => {
    const base = join(dir, `${img.split('/').pop()}.base.${baseFormat}`);
    qemuImg('convert', '-q', '-f', 'raw', '-O', baseFormat, src, base);
    qemuImg('create', '-q', '-f', format, '-b', base, '-F', baseFormat, img, String(SIZE));
    qemuIo(
      '-f',
      format,
      '-c',
      'write -P 0x33 1M 192k',
      '-c',
      'write -P 0x44 5M 64k',
      '-c',
      'write -z 9M 128k',
      '-c',
      'write -P 0x55 11M 4k',
      img,
    );
  };
}

const CASES: Case[] = [
  { name: 'sparse.vmdk', format: 'vmdk', make: 'subformat=monolithicSparse' },
  { name: 'flat.vmdk', format: 'vmdk', make: 'subformat=monolithicFlat' },
  { name: 'stream.vmdk', format: 'vmdk', make: 'subformat=streamOptimized', compressed: true },
  { name: 'child.vmdk', format: 'vmdk', make: overlay('vmdk', 'vmdk') },
  { name: 'dyn.vhdx', format: 'vhdx', make: 'subformat=dynamic,block_size=1M' },
  { name: 'fixed.vhdx', format: 'vhdx', make: 'subformat=fixed' },
  { name: 'dyn.vhd', format: 'vpc', make: 'subformat=dynamic' },
  { name: 'fixed.vhd', format: 'vpc', make: 'subformat=fixed' },
  { name: 'static.vdi', format: 'vdi', make: 'static=on' },
  { name: 'dyn.vdi', format: 'vdi', make: 'static=off' },
  { name: 'disk.qed', format: 'qed', make: 'cluster_size=65536' },
  { name: 'top.qed', format: 'qed', make: overlay('raw', 'qed') },
];

/** Random 4 KiB-aligned ranges of 4 KiB to 128 KiB inside [0, size). */
function randomRanges(seed: number, size: number): [number, number][] {
  const rand = seededRandom(seed);
  const blocks = Math.floor(size / (4 * K));
  const out: [number, number][] = [];
  for (let i = 0; i < READS; i++) {
    const n = Math.min(1 + Math.floor(rand() * 32), blocks);
    const first = Math.floor(rand() * (blocks - n + 1));
    out.push([first * 4 * K, n * 4 * K]);
  }
  return out;
}

/** The binding's inflation counters (process-wide). */
function inflateStats() {
  const a = loadFuse3();
  assert.ok(a, 'the libfuse 3 binding is built');
  return a.inflateStats();
}

describe('the FUSE fast path on vmdk, vhdx, vpc, vdi and qed', { concurrency: false }, () => {
  for (const c of CASES) {
    test(`${c.name}: O_DIRECT random reads after a warm-up are exact and served by the workers`, async (t) => {
      if (!needTools(t, 'qemu-img', 'qemu-io', 'python3', '/dev/fuse')) return;
      if (!loadFuse3()) assert.fail('the libfuse 3 binding is not built');
      // After-hooks run first in, first out: the export and graph stop before the directory goes.
      const stops: (() => Promise<void>)[] = [];
      t.after(async () => {
        for (const stop of stops.reverse()) await stop().catch(() => undefined);
      });
      const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
      const src = join(dir, 'guest.raw');
      writeFileSync(src, guestData(7));
      const img = join(dir, c.name);
      if (typeof c.make === 'string')
        qemuImg('convert', '-q', '-f', 'raw', '-O', c.format, '-o', c.make, src, img);
      else c.make(dir, src, img);
      qemuImg('convert', '-q', '-f', c.format, '-O', 'raw', img, `${img}.ref`);
      const want = readFileSync(`${img}.ref`);

      const graph = await openGraph(
        [
          { driver: 'file', nodeName: 'prot', filename: img, readOnly: true },
          { driver: c.format, nodeName: 'fmt', file: 'prot', readOnly: true },
        ],
        { allowedRoots: [dir] },
      );
      stops.push(() => graph.close());
      const mountpoint = join(dir, 'mnt');
      writeFileSync(mountpoint, '');
      const exp = (await fuseExportDriver.start(graph.get('fmt')!, {
        id: 'exp0',
        mountpoint,
        writable: false,
        growable: false,
        allowOther: 'off',
        fsname: fsnameFor('mount', process.pid),
      })) as FuseExport;
      stops.push(() => exp.stop());

      // Warm-up: the whole export once (reads served in JavaScript install the mapping around them).
      const whole = await execFileP('dd', [`if=${mountpoint}`, 'bs=65536', 'iflag=direct', 'status=none'], {
        encoding: 'buffer',
        maxBuffer: 2 * SIZE,
        timeout: 60_000,
      });
      assert.equal(whole.stdout.length, want.length, 'size');
      assert.ok(whole.stdout.equals(want), 'first pass equals qemu-img convert -O raw');

      const ranges = randomRanges(11, Math.floor(want.length / (4 * K)) * 4 * K);
      const before = exp.nativeStats!.reads;
      const inflatedBefore = inflateStats().inflated + inflateStats().cacheHits;
      const r = await execFileP('python3', [CLIENT, mountpoint, ...ranges.map(([o, n]) => `${o}:${n}`)], {
        encoding: 'buffer',
        maxBuffer: READS * 128 * K + M,
        timeout: 60_000,
      });
      let at = 0;
      for (const [off, n] of ranges) {
        const got = r.stdout.subarray(at, at + n);
        if (!got.equals(want.subarray(off, off + n))) {
          let i = 0;
          while (got[i] === want[off + i]) i++;
          assert.fail(
            `${c.name}: O_DIRECT read of ${n} bytes at ${off} differs first at guest offset ${off + i}`,
          );
        }
        at += n;
      }
      assert.equal(at, r.stdout.length, 'the client read every range');
      const native = exp.nativeStats!.reads - before;
      assert.ok(native >= READS * 0.9, `${c.name}: only ${native} of ${READS} reads were served natively`);
      if (c.compressed) {
        // The workers inflated the grains themselves (never read as plain bytes: the bytes above say so).
        const inflated = inflateStats().inflated + inflateStats().cacheHits - inflatedBefore;
        assert.ok(inflated > 0, `${c.name}: no compressed grain was inflated by the workers`);
      }
    });
  }
});
