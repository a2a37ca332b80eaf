/**
 * A vhdx image served natively through a real FUSE mount (`blkexport mount`),
 * read from child processes and compared byte for byte with
 * `qemu-img convert -O raw`; `blkexport info` agrees with qemu-img; a
 * writable mount is refused naming the format.
 */
import assert from 'node:assert/strict';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { applyWrites, convertToRaw, scatteredWrites } from '../block/images.js';
import { createVhdx, M } from '../block/vhdx-images.js';
import { cleanupMountsUnder, mountsUnder, readExport } from '../helpers/mounts.js';
import { BIN, needTools, run, runOk, tempDir } from '../helpers/tools.js';

function blk(...args: string[]) {
  return run(BIN, args, { timeoutMs: 60_000 });
}

describe('vhdx through blkexport mount (native engine)', { concurrency: false }, () => {
  test('a dynamic vhdx reads byte-identical to qemu-img convert from another process', (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io', '/dev/fuse')) return;
    const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
    const img = createVhdx(join(dir, 'disk.vhdx'), 48 * M + 4096, { block_size: '2M' });
    applyWrites(dir, img, 'vhdx', scatteredWrites(77, 48 * M, 2 * M, 8 * M, 20), 77);
    const raw = readFileSync(convertToRaw(img, join(dir, 'oracle.raw')));

    const info = JSON.parse(runOk(BIN, ['info', '-o', 'json', img])) as Record<string, unknown>;
    const theirs = JSON.parse(runOk('qemu-img', ['info', '--output=json', img])) as Record<string, unknown>;
    assert.deepEqual(info, theirs);

    const mnt = join(dir, 'disk.raw');
    writeFileSync(mnt, '');
    const m = blk('mount', img, mnt, '--daemonize');
    assert.equal(m.status, 0, m.stderr);
    assert.match(m.stdout, /exported .*disk\.vhdx \(vhdx\) on .*disk\.raw as raw, .*read-only/);
    assert.equal(statSync(mnt).size, raw.length);
    const got = readExport(mnt);
    assert.equal(got.length, raw.length);
    assert.ok(got.equals(raw), 'the mounted bytes equal qemu-img convert -O raw');
    // Unaligned reads from another process, through the kernel (dd skip/count in bytes).
    for (const [off, len] of [
      [3 * M - 100, 5000],
      [10 * M + 1, 3 * M],
      [48 * M, 4096],
    ] as const) {
      const part = runOk('sh', [
        '-c',
        `dd if='${mnt}' iflag=skip_bytes,count_bytes skip=${off} count=${len} status=none | sha256sum`,
      ]);
      const want = runOk('sh', [
        '-c',
        `dd if='${join(dir, 'oracle.raw')}' iflag=skip_bytes,count_bytes skip=${off} count=${len} status=none | sha256sum`,
      ]);
      assert.equal(part, want, `range ${off}+${len}`);
    }
    assert.equal(blk('umount', mnt).status, 0);
    assert.equal(mountsUnder(dir).length, 0);
  });

  test('a writable vhdx mount is refused, naming the format', (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
    const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
    const img = createVhdx(join(dir, 'disk.vhdx'), 8 * M);
    const m = blk('mount', img, '--writable', '--daemonize');
    assert.equal(m.status, 1);
    assert.match(m.stderr, /vhdx images are served read-only/);
    assert.equal(mountsUnder(dir).length, 0);
  });
});
