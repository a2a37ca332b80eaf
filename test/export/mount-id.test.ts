/**
 * The native helper's mountIdAsync (statx in the thread pool) answers the
 * id the mount table gives, for a tmpfs mounted by mount(8) and for a FUSE
 * export this very process serves (statx with AT_STATX_DONT_SYNC asks the
 * FUSE server nothing; and it runs off the event loop, which serves the
 * mount all the same). Root only, like every mount test here.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { openGraph } from '../../src/block/index.js';
import { nativeHelper } from '../../src/block/lock-native.js';
import { fuseExportDriver } from '../../src/export/fuse/driver.js';
import { fsnameFor, readMountTable, topMountAt } from '../../src/export/mount-table.js';
import { cleanupMountsUnder } from '../helpers/mounts.js';
import { needTools } from '../helpers/tools.js';

async function tableId(path: string): Promise<number | undefined> {
  return topMountAt(await readMountTable(), path)?.mountId;
}

test('mountIdAsync: the mount table id of a tmpfs and of a FUSE export served here; -errno for a missing path', async (t) => {
  if (!needTools(t, '/dev/fuse')) return;
  if (process.getuid?.() !== 0) {
    assert.ok(process.env.CI !== 'true', 'mounting needs root');
    t.skip('needs root');
    return;
  }
  // One clean-up, in order: the export stops before anything under the directory is touched (this process
  // serves the mount: a stat of it from here would wait for itself).
  const dir = mkdtempSync(join(tmpdir(), 'blkexport-test-'));
  const undo: (() => unknown)[] = [];
  t.after(async () => {
    try {
      for (const fn of undo.reverse()) await Promise.resolve(fn()).catch(() => undefined);
    } finally {
      cleanupMountsUnder(dir);
      rmSync(dir, { recursive: true, force: true });
    }
  });
  const native = nativeHelper();

  const tmp = join(dir, 'tmp');
  mkdirSync(tmp);
  assert.equal(spawnSync('mount', ['-t', 'tmpfs', 'none', tmp]).status, 0, 'mount tmpfs');
  undo.push(() => spawnSync('umount', ['-l', tmp]));
  const tmpId = await tableId(tmp);
  assert.ok(tmpId !== undefined);
  assert.equal(await native.mountIdAsync(tmp), tmpId);

  const img = join(dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(1 << 20, 7));
  const graph = await openGraph(
    [
      { driver: 'file', nodeName: 'prot', filename: img, readOnly: true },
      { driver: 'raw', nodeName: 'fmt', file: 'prot', readOnly: true },
    ],
    { allowedRoots: [dir] },
  );
  undo.push(() => graph.close());
  const mnt = join(dir, 'disk.mnt');
  writeFileSync(mnt, '');
  const exp = await fuseExportDriver.start(graph.get('fmt')!, {
    id: 'exp0',
    mountpoint: mnt,
    writable: false,
    growable: false,
    allowOther: 'off',
    fsname: fsnameFor('mount', process.pid),
  });
  undo.push(() => exp.stop());
  const fuseId = await tableId(mnt);
  assert.ok(fuseId !== undefined && fuseId !== tmpId);
  assert.equal(await native.mountIdAsync(mnt), fuseId);

  assert.equal(await native.mountIdAsync(join(dir, 'missing')), -2);
});
