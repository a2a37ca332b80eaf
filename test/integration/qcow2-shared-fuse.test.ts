/**
 * A hostile qcow2 whose guest clusters 0 and 1 share one COPIED host cluster
 * (test/block/shared-image.ts), served writable by a real agent over FUSE:
 * a write to guest cluster 1 through the mount (from a child process, after
 * reads warmed the binding's map, so its in-place write path is offered the
 * cluster if anything would offer it) answers EIO, guest cluster 0 keeps its
 * bytes, status shows the export failed with the reason (guest clusters and
 * host offset), the log has it too, and the rest of the disk is written.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { SHARED_CLUSTER as CS, makeSharedImage } from '../block/shared-image.js';
import { agentDir, logMatches, startAgent, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { needTools, run } from '../helpers/tools.js';

interface ExportStatus {
  id: string;
  state: string;
  reason: string;
}

/** One 64 KiB cluster of the mount, read with O_DIRECT by dd (a child process). */
function readCluster(mnt: string, gc: number): Buffer {
  const r = spawnSync(
    'dd',
    [`if=${mnt}`, `bs=${CS}`, `skip=${gc}`, 'count=1', 'iflag=direct', 'status=none'],
    {
      timeout: 20_000,
    },
  );
  assert.equal(r.status, 0, r.stderr?.toString());
  return r.stdout;
}

test('shared COPIED cluster over FUSE: the write answers EIO, the other cluster keeps its bytes, status and log say why', async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io', '/dev/fuse', 'dd')) return;
  const d = agentDir(t);
  const { path } = makeSharedImage(d.images);
  const mnt = `${path}.mnt`;
  writeFileSync(
    join(d.manifests, 'shared.yaml'),
    `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: shared\nspec:\n  exports:\n${shorthand('bad', path, { format: 'qcow2', writable: true, mountpoint: mnt, 'create-mountpoint': true })}`,
  );
  const agent = await startAgent(t, d);
  const status = async () =>
    new Map((await agent.get<{ exports: ExportStatus[] }>('/status')).exports.map((e) => [e.id, e]));
  await until('the export ready', async () => (await status()).get('bad')?.state === 'ready', 10_000);

  for (const gc of [0, 1]) assert.ok(readCluster(mnt, gc).equals(Buffer.alloc(CS, 0xaa)));
  const data = join(d.dir, 'x11.bin');
  writeFileSync(data, Buffer.alloc(4096, 0x11));
  const dd = (seek: number) =>
    run('dd', [
      `if=${data}`,
      `of=${mnt}`,
      'bs=4096',
      `seek=${seek}`,
      'count=1',
      'conv=notrunc',
      'oflag=direct',
      'status=none',
    ]);
  const w = dd(CS / 4096); // guest cluster 1
  assert.notEqual(w.status, 0, 'the write into the shared cluster must fail');
  assert.match(w.stderr, /Input\/output error/);
  assert.ok(readCluster(mnt, 0).equals(Buffer.alloc(CS, 0xaa)), 'guest cluster 0 is unchanged');
  assert.ok(readCluster(mnt, 1).equals(Buffer.alloc(CS, 0xaa)), 'guest cluster 1 is unchanged');

  const s = await until('the export failed in status', async () => {
    const e = (await status()).get('bad');
    return e?.state === 'failed' ? e : undefined;
  });
  assert.match(
    s.reason,
    /^I\/O errors: \d+ since .*; last: write: .*guest cluster 1 .*host cluster at offset 0x50000 .*guest clusters 0, 1 use it/,
  );
  await logMatches(agent, /export answered EIO.*0x50000/);

  // The rest of the disk is written as usual.
  assert.equal(dd((2 * CS) / 4096).status, 0);
  assert.ok(readCluster(mnt, 2).subarray(0, 4096).equals(Buffer.alloc(4096, 0x11)));
  assert.ok(readFileSync(path).length > 0);
});
