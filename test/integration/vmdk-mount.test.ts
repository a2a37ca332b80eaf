/**
 * vmdk through real FUSE mounts: `blkexport mount` serves a sparse and a
 * split flat vmdk made by qemu-img (the flat extents and allocated grains go
 * through the fast path's host mapping), read whole from a child process
 * and compared byte for byte with `qemu-img convert -O raw`; a writable
 * mount is refused naming the format; `blkexport info` reports it.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { convertToVmdk, makeRawSource, oracleRaw } from '../block/vmdk-images.js';
import { cleanupMountsUnder, mountsUnder, readExport } from '../helpers/mounts.js';
import { BIN, needTools, run, runOk, tempDir } from '../helpers/tools.js';

const M = 1024 * 1024;

function blk(...args: string[]) {
  return run(BIN, args, { timeoutMs: 60_000 });
}

describe('blkexport mount of vmdk images', { concurrency: false }, () => {
  for (const subformat of ['monolithicSparse', 'twoGbMaxExtentFlat', 'streamOptimized']) {
    test(`${subformat}: served read-only, byte-identical to qemu-img convert`, (t) => {
      if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
      const dir = tempDir(t, 'blkexport-vmdk-', cleanupMountsUnder);
      const src = join(dir, 'src.raw');
      makeRawSource(src, 40 * M + 512, 17);
      const image = join(dir, 'disk.vmdk');
      convertToVmdk(src, image, { subformat });
      const want = readFileSync(oracleRaw(image, join(dir, 'oracle.raw')));

      const refused = blk(
        'mount',
        image,
        join(dir, 'w.raw'),
        '--create-mountpoint',
        '--writable',
        '--daemonize',
      );
      assert.notEqual(refused.status, 0);
      assert.match(refused.stderr, /vmdk/);
      assert.equal(mountsUnder(dir).length, 0);

      const mnt = join(dir, 'disk.raw');
      const m = blk('mount', image, mnt, '--create-mountpoint', '--daemonize');
      assert.equal(m.status, 0, m.stderr);
      assert.match(m.stdout, /\(vmdk\) on .* read-only/);
      const got = readExport(mnt);
      assert.equal(got.length, want.length);
      assert.ok(got.equals(want), 'the export reads like qemu-img convert -O raw');
      const u = blk('umount', mnt);
      assert.equal(u.status, 0, u.stderr);
      assert.equal(mountsUnder(dir).length, 0);

      const info = JSON.parse(runOk(BIN, ['info', '-o', 'json', image])) as Record<string, unknown>;
      const theirs = JSON.parse(runOk('qemu-img', ['info', '--output=json', image])) as Record<
        string,
        unknown
      >;
      assert.equal(info.format, 'vmdk');
      assert.equal(info['virtual-size'], theirs['virtual-size']);
    });
  }
});
