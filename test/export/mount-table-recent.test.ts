/**
 * recentMountTable: the last table read, while it is young and this process
 * has not said it is changing a mount; a fresh read otherwise. A real tmpfs
 * mount made by another process (mount(8)) is the change; root only, like
 * every mount test here (CI=true fails instead of skipping without it).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { mountTableChanging, readMountTable, recentMountTable } from '../../src/export/mount-table.js';
import { tempDir } from '../helpers/tools.js';

test('a young table is handed back until this process changes a mount; then the table is read again', async (t) => {
  if (process.getuid?.() !== 0) {
    assert.ok(process.env.CI !== 'true', 'mounting a tmpfs needs root');
    t.skip('needs root');
    return;
  }
  const dir = join(tempDir(t), 'mnt');
  mkdirSync(dir);
  const has = (table: Awaited<ReturnType<typeof readMountTable>>) => table.some((m) => m.mountpoint === dir);

  assert.equal(has(await readMountTable()), false);
  assert.equal(spawnSync('mount', ['-t', 'tmpfs', 'none', dir]).status, 0, 'mount tmpfs');
  t.after(() => {
    spawnSync('umount', ['-l', dir]);
  });
  // Made by another process since the read, and this process said nothing: the young table stands.
  assert.equal(has(await recentMountTable(60_000)), false);
  // Too old for the caller: read again.
  assert.equal(has(await recentMountTable(0)), true);

  assert.equal(spawnSync('umount', [dir]).status, 0, 'umount');
  assert.equal(has(await recentMountTable(60_000)), true, 'young again, and still the table read before');
  mountTableChanging();
  assert.equal(has(await recentMountTable(60_000)), false, 'read again after mountTableChanging');
});
