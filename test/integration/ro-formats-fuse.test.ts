/**
 * vpc, vdi and qed images served natively through a real FUSE mount by
 * `blkexport mount` (a daemonized child serves; `cat` in another child
 * reads): byte for byte what `qemu-img convert -O raw` gives. A writable
 * mount is refused naming the format. Served in this process (read by
 * children only), the binding's fast path serves the second pass of reads
 * itself from the host extents the drivers map.
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

const execFileP = promisify(execFile);

describe('vpc, vdi and qed on the FUSE fast path', { concurrency: false }, () => {
  test('after a first pass, the binding serves reads itself, with the same bytes', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
    if (!loadFuse3()) assert.fail('the libfuse 3 binding is not built');
    // After-hooks run first in, first out: the exports stop before the directory goes.
    const stops: (() => Promise<void>)[] = [];
    t.after(async () => {
      for (const stop of stops.reverse()) await stop().catch(() => undefined);
    });
    const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
    const cases: [string, string, string][] = [
      ['dyn.vhd', 'vpc', 'subformat=dynamic'],
      ['fixed.vhd', 'vpc', 'subformat=fixed'],
      ['disk.vdi', 'vdi', 'static=off'],
      ['disk.qed', 'qed', 'cluster_size=65536'],
    ];
    let seed = 40;
    for (const [name, format, opts] of cases) {
      const src = join(dir, `${name}.src`);
      writeFileSync(src, guest('sparse', 6 * M, seed++));
      const img = join(dir, name);
      qemuImg('convert', '-q', '-f', 'raw', '-O', format, '-o', opts, src, img);
      qemuImg('convert', '-q', '-f', format, '-O', 'raw', img, `${img}.ref`);
      const want = readFileSync(`${img}.ref`);
      const graph = await openGraph(
        [
          { driver: 'file', nodeName: 'prot', filename: img, readOnly: true },
          { driver: format, nodeName: 'fmt', file: 'prot', readOnly: true },
        ],
        { allowedRoots: [dir] },
      );
      stops.push(() => graph.close());
      const mountpoint = join(dir, `${name}.mnt`);
      writeFileSync(mountpoint, '');
      const exp = (await fuseExportDriver.start(graph.get('fmt')!, {
        id: `e-${name}`,
        mountpoint,
        writable: false,
        growable: false,
        allowOther: 'off',
        fsname: fsnameFor('mount', process.pid),
      })) as FuseExport;
      stops.push(() => exp.stop());
      const read = async () =>
        (
          await execFileP('dd', [`if=${mountpoint}`, 'bs=65536', 'iflag=direct', 'status=none'], {
            encoding: 'buffer',
            maxBuffer: 64 * M,
          })
        ).stdout;
      assert.ok((await read()).equals(want), `${name}: first pass`);
      const before = exp.nativeStats!.reads;
      assert.ok((await read()).equals(want), `${name}: second pass`);
      assert.ok(exp.nativeStats!.reads > before, `${name}: the binding served reads itself`);
    }
  });
});
