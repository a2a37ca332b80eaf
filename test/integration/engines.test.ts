/**
 * The same reconcile cases against both engines: a real agent process with
 * `--engine native` or `--engine qemu` (a real qemu-storage-daemon), real
 * manifests, real mounts, bytes compared with qemu-img convert.
 */
import assert from 'node:assert/strict';
import { readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  convertToRaw,
  mountAt,
  QSD_TOOLS,
  qsdAgentSetup,
  qsdPid,
  readExport,
} from '../engine/qsd-helpers.js';
import { logMatches, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { mountsUnder } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, randomBytes, run, seededRandom } from '../helpers/tools.js';

interface Status {
  manifests: { file: string; valid: boolean; lastGoodInForce?: boolean }[];
  exports: { id: string; engine: string; state: string; reason: string; mountpoint: string }[];
}

function manifest(name: string, exports: string): string {
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n  exports:\n${exports}`;
}

function makeQcow2(dir: string, name: string, seed: number, size = 1 << 20): { qcow2: string; data: Buffer } {
  const raw = join(dir, `${name}.ref`);
  const data = randomBytes(seededRandom(seed), size);
  writeFileSync(raw, data);
  const qcow2 = join(dir, `${name}.qcow2`);
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2);
  rmSync(raw);
  return { qcow2, data };
}

function isServed(path: string, engine: string): boolean {
  const m = mountAt(path);
  return engine === 'qemu' ? m?.fstype === 'fuse' : m?.fstype === 'fuse.blkexport';
}

for (const engine of ['native', 'qemu'] as const) {
  describe(`reconcile through the ${engine} engine`, { concurrency: false }, () => {
    const tools = engine === 'qemu' ? QSD_TOOLS : ['qemu-img', '/dev/fuse'];

    const setup = async (t: Parameters<typeof qsdAgentSetup>[0]) => qsdAgentSetup(t, engine);

    test('add, writable edit, invalid YAML keeps the last good version, delete', async (t) => {
      if (!needTools(t, ...tools)) return;
      const { d, qsdDir, start } = await setup(t);
      const img = makeQcow2(d.images, 'disk', 101);
      const plain = join(d.images, 'plain.raw');
      writeFileSync(plain, randomBytes(seededRandom(102), 1 << 20));
      const agent = await start();
      const file = join(d.manifests, 'disks.yaml');
      const ro = shorthand('disk', img.qcow2) + shorthand('plain', plain, { format: 'raw' });
      writeFileSync(file, manifest('disks', ro));
      const s = await until('both ready', async () => {
        const st = await agent.get<Status>('/status');
        return st.exports.length === 2 && st.exports.every((e) => e.state === 'ready') ? st : undefined;
      });
      assert.deepEqual(
        s.exports.map((e) => e.engine),
        [engine, engine],
      );
      assert.ok(isServed(img.qcow2, engine));
      assert.ok(readExport(img.qcow2).equals(img.data));
      if (engine === 'qemu') assert.ok(qsdPid(qsdDir), 'one qemu-storage-daemon runs');
      else assert.equal(qsdPid(qsdDir), undefined, 'no qemu-storage-daemon for native manifests');

      // writable: true, then a write through the export lands in the image.
      writeFileSync(
        file,
        manifest(
          'disks',
          shorthand('disk', img.qcow2) + shorthand('plain', plain, { format: 'raw', writable: true }),
        ),
      );
      await until('plain writable', async () => {
        const st = await agent.get<Status>('/status');
        return (
          isServed(plain, engine) &&
          st.exports.every((e) => e.state === 'ready') &&
          (statSync(plain).mode & 0o777) === 0o600
        );
      });
      // The native engine changes writable in place; the qemu engine remounts (the plan said so).
      await logMatches(
        agent,
        engine === 'native'
          ? /applied step="reopen-export" export="plain"/
          : /applied step="remove-export" export="plain" engine="qemu" replace="writable changed; the qemu engine remounts to change it"/,
      );
      const w = run('dd', [
        'if=/dev/zero',
        `of=${plain}`,
        'bs=4096',
        'seek=1',
        'count=1',
        'conv=notrunc,fsync',
      ]);
      assert.equal(w.status, 0, w.stderr);

      // Invalid YAML: nothing changes, the error shows.
      writeFileSync(file, `${manifest('disks', ro)}    - id: [broken\n`);
      await until('the error in status', async () => {
        const st = await agent.get<Status>('/status');
        return st.manifests.some((m) => !m.valid && m.lastGoodInForce);
      });
      assert.ok(isServed(img.qcow2, engine) && isServed(plain, engine));
      const plan = run(BIN, ['plan', '--manifests', d.manifests, '--socket', agent.socket]);
      assert.equal(plan.status, 1, 'an invalid manifest makes plan exit 1');

      rmSync(file);
      await until('unmounted', () => !mountAt(img.qcow2) && !mountAt(plain));
      assert.ok(readFileSync(plain).subarray(4096, 8192).equals(Buffer.alloc(4096)));
      assert.equal(run('qemu-img', ['check', img.qcow2]).status, 0);
      agent.proc.kill('SIGTERM');
      assert.equal(await agent.exited, 0);
      assert.equal(mountsUnder(d.dir).length, 0);
      assert.equal(qsdPid(qsdDir), undefined, 'SIGTERM stops qemu-storage-daemon too');
    });

    test('an export unmounted behind our back is repaired; plan is then empty', async (t) => {
      if (!needTools(t, ...tools)) return;
      const { d, start } = await setup(t);
      const img = makeQcow2(d.images, 'r', 111);
      const mnt = join(d.images, 'r.raw');
      writeFileSync(
        join(d.manifests, 'r.yaml'),
        manifest('r', shorthand('r', img.qcow2, { mountpoint: mnt, 'create-mountpoint': true })),
      );
      const agent = await start();
      await until('r mounted', () => isServed(mnt, engine));
      assert.equal(run('umount', ['-l', mnt]).status, 0);
      await agent.post('/reconcile');
      await until('r mounted again', () => isServed(mnt, engine));
      await logMatches(agent, /applied step="repair-export" export="r"/);
      assert.ok(readExport(mnt).equals(img.data));
      const plan = run(BIN, ['plan', '--manifests', d.manifests, '--socket', agent.socket]);
      assert.equal(plan.status, 0, plan.stdout + plan.stderr);
    });

    test('paths outside the allowed roots and a corrupt image fail alone', async (t) => {
      if (!needTools(t, ...tools)) return;
      const { d, start } = await setup(t);
      const good = makeQcow2(d.images, 'good', 121);
      const outside = join(d.dir, 'outside.raw');
      writeFileSync(outside, Buffer.alloc(1 << 20));
      symlinkSync(outside, join(d.images, 'link.raw'));
      const corrupt = join(d.images, 'corrupt.qcow2');
      qemuImg('create', '-f', 'qcow2', corrupt, '1M');
      const hdr = readFileSync(corrupt);
      hdr.writeUInt32BE(30, 20); // cluster_bits out of range
      writeFileSync(corrupt, hdr);
      const mp = (n: string) => ({ mountpoint: join(d.images, n), 'create-mountpoint': true });
      writeFileSync(
        join(d.manifests, 'mixed.yaml'),
        manifest(
          'mixed',
          shorthand('good', good.qcow2) +
            shorthand('out', outside, mp('o.raw')) +
            shorthand('link', join(d.images, 'link.raw'), mp('l.raw')) +
            shorthand('bad', corrupt, mp('b.raw')),
        ),
      );
      const agent = await start();
      const by = await until('good ready, the rest failed', async () => {
        const st = await agent.get<Status>('/status');
        const m = new Map(st.exports.map((e) => [e.id, e]));
        return m.get('good')?.state === 'ready' &&
          ['out', 'link', 'bad'].every((id) => m.get(id)?.state === 'failed')
          ? m
          : undefined;
      });
      assert.match(by.get('out')!.reason, /outside the allowed roots/);
      assert.match(by.get('link')!.reason, /outside the allowed roots/);
      assert.match(by.get('bad')!.reason, /cluster/i);
      assert.ok(readExport(good.qcow2).equals(convertToRaw(good.qcow2, join(d.dir, 'good.out'))));

      // A corrupt image is a terminal failure: not retried when its backoff (1 s) would have
      // passed, only when the image changes.
      assert.match(by.get('bad')!.reason, /\(retried when its manifest or image changes\)$/);
      const attempts = () => agent.log().match(/export failed export="bad"/g)?.length ?? 0;
      const before = attempts();
      await sleep(1500);
      await agent.post('/reconcile');
      assert.equal(attempts(), before, 'no retry by time');
      qemuImg('create', '-f', 'qcow2', `${corrupt}.new`, '1M');
      renameSync(`${corrupt}.new`, corrupt);
      await agent.post('/reconcile');
      await until('bad ready once its image is fixed', async () => {
        const st = await agent.get<Status>('/status');
        return st.exports.find((e) => e.id === 'bad')?.state === 'ready';
      });
    });
  });
}
