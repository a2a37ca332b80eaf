/**
 * Incremental passes, end to end: a real agent process (resync far away, so
 * only watch events start passes), real manifests, real FUSE mounts, reads
 * from this non-serving process. An edit costs its own exports; collisions
 * stay host-wide; the full pass still catches drift elsewhere.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { agentDir, logMatches, startAgent, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { mountsUnder, readExport } from '../helpers/mounts.js';
import { needTools, qemuImg, randomBytes, run, seededRandom } from '../helpers/tools.js';

const TOOLS = ['qemu-img', '/dev/fuse'];

interface Status {
  agent: { passes: number };
  manifests: { file: string; valid: boolean }[];
  exports: { id: string; state: string; reason: string }[];
}

function manifest(name: string, exports: string): string {
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n  exports:\n${exports}`;
}

/** A qcow2 image with seeded content; the content as a buffer. */
function makeImage(dir: string, name: string, seed: number): { qcow2: string; data: Buffer } {
  const raw = join(dir, `${name}.ref`);
  const data = randomBytes(seededRandom(seed), 1 << 20);
  writeFileSync(raw, data);
  const qcow2 = join(dir, `${name}.qcow2`);
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2);
  return { qcow2, data };
}

function isMounted(path: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === path && l.includes('fuse.blkexport'));
}

/** Waits for `n` more passes than `before` (watch events start them after a short debounce). */
async function passesAfter(agent: { get<T>(p: string): Promise<T> }, before: number, n = 1): Promise<void> {
  await until(
    `${n} more pass(es)`,
    async () => (await agent.get<Status>('/status')).agent.passes >= before + n,
  );
}

describe('blkexport agent: incremental passes', { concurrency: false }, () => {
  test('an edit touches only its own exports; the full pass repairs drift elsewhere', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const imgs = ['a', 'b', 'c'].map((n, i) => ({ n, ...makeImage(d.images, n, 300 + i) }));
    const mnt = (n: string) => join(d.images, `${n}.raw`);
    for (const { n, qcow2 } of imgs)
      writeFileSync(
        join(d.manifests, `${n}.yaml`),
        manifest(n, shorthand(n, qcow2, { mountpoint: mnt(n), 'create-mountpoint': true })),
      );
    const extra = makeImage(d.images, 'extra', 309);
    const agent = await startAgent(t, d, ['--resync', '3600']);
    await until('a, b, c ready', async () => {
      const s = await agent.get<Status>('/status');
      return s.exports.length === 3 && s.exports.every((e) => e.state === 'ready');
    });

    // Drift outside what the next edit touches: b unmounted behind the agent's back.
    assert.equal(run('umount', ['-l', mnt('b')]).status, 0);
    assert.equal(isMounted(mnt('b')), false);

    // Edit a: a second export of a's image. The pass it starts adds a2 and leaves b alone.
    const before = (await agent.get<Status>('/status')).agent.passes;
    writeFileSync(
      join(d.manifests, 'a.yaml'),
      manifest(
        'a',
        shorthand('a', imgs[0]!.qcow2, { mountpoint: mnt('a'), 'create-mountpoint': true }) +
          shorthand('a2', extra.qcow2, { mountpoint: mnt('a2'), 'create-mountpoint': true }),
      ),
    );
    await until('a2 mounted', () => isMounted(mnt('a2')), 10_000);
    await passesAfter(agent, before);
    await sleep(300); // a pass that would repair b has had its time
    assert.equal(isMounted(mnt('b')), false, 'the incremental pass must not touch b');
    assert.doesNotMatch(agent.log(), /repair-export" export="b"/);
    assert.deepEqual(readExport(mnt('a2')), extra.data);
    assert.deepEqual(readExport(mnt('c')), imgs[2]!.data);

    // A full pass (what the resync timer does) repairs b.
    await agent.post('/reconcile');
    await until('b mounted again', () => isMounted(mnt('b')));
    await logMatches(agent, /applied step="repair-export" export="b"/);
    assert.deepEqual(readExport(mnt('b')), imgs[1]!.data);

    // Removing a.yaml removes a and a2 only.
    const n = (await agent.get<Status>('/status')).agent.passes;
    run('rm', [join(d.manifests, 'a.yaml')]);
    await until('a and a2 unmounted', () => !isMounted(mnt('a')) && !isMounted(mnt('a2')), 10_000);
    await passesAfter(agent, n);
    assert.equal(isMounted(mnt('b')), true);
    assert.equal(isMounted(mnt('c')), true);
    agent.proc.kill('SIGTERM');
    assert.equal(await agent.exited, 0);
    assert.equal(mountsUnder(d.dir).length, 0);
  });

  test('a collision across manifests is decided host-wide: freeing a mountpoint brings the other manifest in', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const x = makeImage(d.images, 'x', 401);
    const y = makeImage(d.images, 'y', 402);
    const shared = join(d.images, 'shared.raw');
    const moved = join(d.images, 'moved.raw');
    const xFile = join(d.manifests, 'a-x.yaml');
    writeFileSync(
      xFile,
      manifest('x', shorthand('x', x.qcow2, { mountpoint: shared, 'create-mountpoint': true })),
    );
    writeFileSync(
      join(d.manifests, 'b-y.yaml'),
      manifest('y', shorthand('y', y.qcow2, { mountpoint: shared, 'create-mountpoint': true })),
    );
    const agent = await startAgent(t, d, ['--resync', '3600']);
    await until('x ready, b-y.yaml refused', async () => {
      const s = await agent.get<Status>('/status');
      return (
        s.exports.find((e) => e.id === 'x')?.state === 'ready' &&
        s.manifests.find((m) => m.file.endsWith('b-y.yaml'))?.valid === false
      );
    });
    assert.deepEqual(readExport(shared), x.data);

    // Only a-x.yaml changes; b-y.yaml, unchanged on disk, comes into force and is served.
    writeFileSync(
      xFile,
      manifest('x', shorthand('x', x.qcow2, { mountpoint: moved, 'create-mountpoint': true })),
    );
    await until(
      'x on its new mountpoint, y on the freed one',
      async () => {
        const s = await agent.get<Status>('/status');
        return s.exports.length === 2 && s.exports.every((e) => e.state === 'ready');
      },
      10_000,
    );
    assert.deepEqual(readExport(moved), x.data);
    assert.deepEqual(readExport(shared), y.data);
    const s = await agent.get<Status>('/status');
    assert.ok(s.manifests.every((m) => m.valid));

    // And back: now y holds the mountpoint, so the edit of x is the one refused; x keeps its last good version.
    writeFileSync(
      xFile,
      manifest('x', shorthand('x', x.qcow2, { mountpoint: shared, 'create-mountpoint': true })),
    );
    await until(
      'the edit of a-x.yaml refused',
      async () =>
        (await agent.get<Status>('/status')).manifests.find((m) => m.file === xFile)?.valid === false,
      10_000,
    );
    assert.deepEqual(readExport(moved), x.data);
    assert.deepEqual(readExport(shared), y.data);
    agent.proc.kill('SIGTERM');
    assert.equal(await agent.exited, 0);
    assert.equal(mountsUnder(d.dir).length, 0);
  });
});
