/**
 * vpc, vdi and qed images served natively through a real FUSE mount by
 * `blkexport mount` (a daemonized child serves; `cat` in another child
 * reads): byte for byte what `qemu-img convert -O raw` gives. A writable
 * mount is refused naming the format.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { guest } from '../block/ro-formats.js';
import { cleanupMountsUnder, mountsUnder, readExport } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, run, tempDir } from '../helpers/tools.js';

const M = 1024 * 1024;

function blk(...args: string[]) {
  return run(BIN, args, { timeoutMs: 60_000 });
}

describe('vpc, vdi and qed through a FUSE mount', { concurrency: false }, () => {
  test('each format reads through the mount exactly as qemu-img convert; --writable is refused', (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
    const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
    const base = join(dir, 'base.raw');
    writeFileSync(base, guest('random', 4 * M, 5));
    const cases: [string, string, string[], string | undefined][] = [
      ['dyn.vhd', 'vpc', ['-o', 'subformat=dynamic'], undefined],
      ['fixed.vhd', 'vpc', ['-o', 'subformat=fixed'], 'vpc'],
      ['disk.vdi', 'vdi', ['-o', 'static=off'], undefined],
      ['static.vdi', 'vdi', ['-o', 'static=on'], undefined],
      ['disk.qed', 'qed', ['-o', 'cluster_size=65536'], undefined],
    ];
    let seed = 1;
    const refusedOnce = new Set<string>();
    for (const [name, format, opts, explicit] of cases) {
      const src = join(dir, `${name}.src`);
      writeFileSync(src, guest('sparse', 6 * M + 4096, seed++));
      const img = join(dir, name);
      qemuImg('convert', '-q', '-f', 'raw', '-O', format, ...opts, src, img);
      const ref = join(dir, `${name}.ref`);
      qemuImg('convert', '-q', '-f', format, '-O', 'raw', img, ref);
      const want = readFileSync(ref);
      const mnt = join(dir, `${name}.mnt`);
      writeFileSync(mnt, '');
      const fmt = explicit ? ['--format', explicit] : [];
      if (!refusedOnce.has(format)) {
        refusedOnce.add(format);
        const refused = blk('mount', img, mnt, ...fmt, '--writable', '--daemonize');
        assert.notEqual(refused.status, 0, `${name}: writable mount`);
        assert.match(refused.stderr, new RegExp(`${format}.*read`), `${name}: ${refused.stderr}`);
        assert.equal(mountsUnder(dir).length, 0);
      }

      const m = blk('mount', img, mnt, ...fmt, '--daemonize');
      assert.equal(m.status, 0, m.stderr);
      assert.match(m.stdout, new RegExp(`\\(${format}\\)`));
      const got = readExport(mnt);
      assert.equal(got.length, want.length, `${name}: size`);
      assert.ok(got.equals(want), `${name}: bytes through the mount`);
      const u = blk('umount', mnt);
      assert.equal(u.status, 0, u.stderr);
    }
    // A qed over its raw backing file.
    const top = join(dir, 'top.qed');
    qemuImg('create', '-q', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', top, String(6 * M));
    qemuImg('convert', '-q', '-f', 'qed', '-O', 'raw', top, join(dir, 'top.ref'));
    const mnt = join(dir, 'top.mnt');
    writeFileSync(mnt, '');
    const m = blk('mount', top, mnt, '--daemonize');
    assert.equal(m.status, 0, m.stderr);
    assert.ok(readExport(mnt).equals(readFileSync(join(dir, 'top.ref'))), 'qed over raw through the mount');
    assert.equal(blk('umount', mnt).status, 0);
    assert.equal(mountsUnder(dir).length, 0);
  });
});
