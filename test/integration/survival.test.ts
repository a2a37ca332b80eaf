/**
 * Native exports outlive the agent process: a client keeps reading and
 * writing through a writable qcow2 export while the agent is SIGKILLed and
 * started again, or hands over (SIGUSR2) and is started again; it sees
 * pauses, never an error, and every write it was told was done is in the
 * image. A stop (SIGTERM) still leaves nothing mounted. Real agent processes,
 * real FUSE mounts, real images made and checked by qemu-img.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { type AgentHandle, agentDir, logMatches, startAgent, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { mountsUnder } from '../helpers/mounts.js';
import { needTools, qemuImg, run, seededRandom } from '../helpers/tools.js';

const CLIENT = new URL('./survival-client.mjs', import.meta.url).pathname;
const TOOLS = ['qemu-img', '/dev/fuse'];
const SIZE = 64 << 20;

interface Status {
  exports: { id: string; state: string; adopted?: boolean; servedSince?: string; reason: string }[];
}

function manifest(name: string, body: string): string {
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata: { name: ${name} }\nspec:\n  exports:\n${body}`;
}

function mountIdAt(path: string): number | undefined {
  const line = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .filter((l) => l.split(' ')[4] === path)
    .at(-1);
  return line === undefined ? undefined : Number(line.split(' ')[0]);
}

/** A fresh qcow2 in the test's image directory and a manifest exporting it writable on `<name>.raw`. */
function writableExport(
  d: { images: string; manifests: string },
  name: string,
): { img: string; mnt: string } {
  const img = join(d.images, `${name}.qcow2`);
  qemuImg('create', '-q', '-f', 'qcow2', img, String(SIZE));
  const mnt = join(d.images, `${name}.raw`);
  const body = shorthand(name, img, {
    format: 'qcow2',
    writable: true,
    mountpoint: mnt,
    'create-mountpoint': true,
  });
  writeFileSync(join(d.manifests, `${name}.yaml`), manifest(name, body));
  return { img, mnt };
}

async function ready(agent: AgentHandle, id: string, adopted: boolean): Promise<Status['exports'][number]> {
  return until(
    `${id} ready${adopted ? ' (adopted)' : ''}`,
    async () => {
      const e = (await agent.get<Status>('/status')).exports.find((x) => x.id === id);
      return e?.state === 'ready' && (e.adopted ?? false) === adopted ? e : undefined;
    },
    20_000,
  );
}

/** Starts the client on `path`; resolves its summary once `stop()` was called and it finished. */
function startClient(
  t: { after(fn: () => void | Promise<void>): void },
  dir: string,
  path: string,
  initial: Buffer,
) {
  const stopFile = join(dir, 'client.stop');
  const initialFile = join(dir, 'client.initial');
  writeFileSync(initialFile, initial);
  const proc: ChildProcess = spawn(
    process.execPath,
    [
      CLIENT,
      path,
      String(SIZE),
      '4242',
      stopFile,
      join(dir, 'client.model'),
      join(dir, 'client.json'),
      initialFile,
    ],
    { stdio: ['ignore', 'inherit', 'inherit'] },
  );
  const exited = new Promise<number | null>((resolve) => proc.on('exit', resolve));
  t.after(async () => {
    // The test directory may be gone already (its clean-up was registered first).
    if (proc.exitCode === null) proc.kill('SIGKILL');
    await Promise.race([exited, sleep(5000)]);
  });
  return {
    async stop(): Promise<{
      summary: { writes: number; errors: number; messages: string[]; longestMs: number };
      model: Buffer;
    }> {
      writeFileSync(stopFile, '');
      assert.equal(await exited, 0, 'the client exits cleanly');
      return {
        summary: JSON.parse(readFileSync(join(dir, 'client.json'), 'utf8')),
        model: readFileSync(join(dir, 'client.model')),
      };
    },
  };
}

describe('native exports outlive the agent process', { concurrency: false }, () => {
  test('20 SIGKILLs of the agent under a writing client: no I/O error, every acknowledged write in the image', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const { img, mnt } = writableExport(d, 'disk');
    let agent = await startAgent(t, d);
    const first = await ready(agent, 'disk', false);
    const mountId = mountIdAt(mnt);
    const client = startClient(t, d.dir, mnt, Buffer.alloc(SIZE));
    const rand = seededRandom(99);
    for (let i = 0; i < 20; i++) {
      await sleep(200 + Math.floor(rand() * 400));
      agent.proc.kill('SIGKILL');
      await agent.exited;
      agent = await startAgent(t, d);
      const e = await ready(agent, 'disk', true);
      assert.notEqual(e.servedSince, first.servedSince, 'served by the new process');
      assert.equal(mountIdAt(mnt), mountId, 'the very same mount, never remounted');
    }
    await sleep(500);
    const { summary, model } = await client.stop();
    assert.equal(summary.errors, 0, `client errors: ${summary.messages.join('; ')}`);
    assert.ok(summary.writes > 20, `the client kept writing (${summary.writes} writes)`);
    t.diagnostic(`${summary.writes} writes, longest pause ${summary.longestMs} ms`);

    agent.proc.kill('SIGTERM');
    assert.equal(await agent.exited, 0);
    assert.deepEqual(mountsUnder(d.dir), [], 'a stop leaves nothing mounted');
    assert.equal(existsSync(join(d.dir, 'fdstore.sock')), false, 'the fd holder is gone');
    const check = run('qemu-img', ['check', img]);
    assert.ok(check.status === 0 || check.status === 3, `qemu-img check: ${check.stdout}${check.stderr}`);
    const raw = join(d.dir, 'out.raw');
    qemuImg('convert', '-O', 'raw', img, raw);
    assert.ok(readFileSync(raw).equals(model), 'every acknowledged write is in the image');
  });

  test('handover (SIGUSR2) and restart, as systemctl restart does: an ext4 on a loop device keeps working', async (t) => {
    if (!needTools(t, ...TOOLS, 'mkfs.ext4', 'e2fsck', 'losetup')) return;
    // Registered first, so it runs before the test directory goes (hooks run in order).
    let writer: ChildProcess | undefined;
    t.after(() => {
      writer?.kill('SIGKILL');
    });
    const d = agentDir(t);
    const { img, mnt } = writableExport(d, 'fs');
    let agent = await startAgent(t, d);
    await ready(agent, 'fs', false);
    assert.equal(run('mkfs.ext4', ['-q', '-F', mnt]).status, 0);
    const fsdir = join(d.dir, 'ext4');
    run('mkdir', ['-p', fsdir]);
    const m = run('mount', ['-o', 'loop', mnt, fsdir]);
    assert.equal(m.status, 0, m.stderr);
    t.after(() => {
      run('umount', ['-l', fsdir]);
    });
    // A writer in the file system: files with seeded content, each synced.
    writer = spawn(
      'sh',
      [
        '-c',
        'i=0; while [ ! -e "$1/../stop" ]; do head -c 65536 /dev/urandom > "$1/f$i" && sync "$1/f$i" && sha256sum "$1/f$i" >> "$1/../sums" || echo "ERROR $i" >> "$1/../errors"; i=$((i+1)); done',
        'writer',
        fsdir,
      ],
      { stdio: 'ignore' },
    );
    const wrote = new Promise<number | null>((resolve) => writer.on('exit', resolve));
    for (let i = 0; i < 5; i++) {
      await sleep(400);
      agent.proc.kill(i === 2 ? 'SIGKILL' : 'SIGUSR2');
      const code = await agent.exited;
      if (i !== 2) assert.equal(code, 75, 'a handover exits 75 for the supervisor to start the next agent');
      agent = await startAgent(t, d);
      await ready(agent, 'fs', true);
    }
    writeFileSync(join(d.dir, 'stop'), '');
    assert.equal(await wrote, 0);
    assert.equal(existsSync(join(d.dir, 'errors')), false, 'the writer saw no error');
    const sums = run('sha256sum', ['-c', join(d.dir, 'sums')], { cwd: fsdir });
    assert.equal(sums.status, 0, sums.stdout + sums.stderr);
    assert.equal(run('umount', [fsdir]).status, 0);
    agent.proc.kill('SIGTERM');
    assert.equal(await agent.exited, 0);
    assert.deepEqual(mountsUnder(d.dir), []);
    const raw = join(d.dir, 'fs.out');
    qemuImg('convert', '-O', 'raw', img, raw);
    const fsck = run('e2fsck', ['-fn', raw]);
    assert.equal(fsck.status, 0, fsck.stdout + fsck.stderr);
  });

  test("an agent starting beside another agent's kept mount leaves it alone, and still cleans a stale one", async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    // Agent A's mount, kept by A's fd holder while no agent of A runs: the pid in its source is dead.
    const a = agentDir(t);
    const { mnt: kept } = writableExport(a, 'kept');
    const a1 = await startAgent(t, a);
    await ready(a1, 'kept', false);
    const keptId = mountIdAt(kept);
    a1.proc.kill('SIGKILL');
    await a1.exited;
    // Agent B (its own manifests and fd holder): its predecessor kept nothing, so its mount is truly stale.
    const b = agentDir(t);
    writableExport(b, 'stale');
    const b0 = await startAgent(t, b, [], { BLKEXPORT_FUSE_RESEND: 'off' });
    await ready(b0, 'stale', false);
    b0.proc.kill('SIGKILL');
    await b0.exited;
    const b1 = await startAgent(t, b);
    await ready(b1, 'stale', false);
    // B1 could mount anew only once the stale mount was gone: cleaned by B1 itself, for its dead
    // connection, unless an agent of a test running beside this one cleaned it first.
    assert.doesNotMatch(b1.log(), /left alone[^\n]*stale\.raw/);
    const cleanedStale = b1
      .log()
      .split('\n')
      .filter((l) => /cleaned a stale mount.*stale\.raw/.test(l));
    for (const line of cleanedStale) assert.match(line, /its FUSE connection is gone/);
    // Both of B's agents started while A's mount was kept with its agent dead.
    assert.equal(mountIdAt(kept), keptId, "A's kept mount is still there");
    for (const log of [b0.log(), b1.log()]) {
      assert.doesNotMatch(log, /cleaned a stale mount[^\n]*kept\.raw/);
      assert.match(log, /left alone a mount whose agent is gone[^\n]*kept\.raw/);
    }
    // A's next agent adopts that very mount.
    const a2 = await startAgent(t, a);
    await ready(a2, 'kept', true);
    assert.equal(mountIdAt(kept), keptId, 'the very same mount, adopted');
    assert.doesNotMatch(a2.log(), /let go/);
  });

  test('a restarted agent lets go what no manifest wants, and never serves a replaced image through a kept mount', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const mk = (name: string, byte: number) => {
      const raw = join(d.dir, `${name}.src`);
      writeFileSync(raw, Buffer.alloc(1 << 20, byte));
      const q = join(d.images, `${name}.qcow2`);
      qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, q);
      return q;
    };
    const gone = mk('gone', 0x11);
    const swap = mk('swap', 0x22);
    const mp = (n: string) => ({ mountpoint: join(d.images, `${n}.raw`), 'create-mountpoint': true });
    writeFileSync(join(d.manifests, 'gone.yaml'), manifest('gone', shorthand('gone', gone, mp('gone'))));
    writeFileSync(join(d.manifests, 'swap.yaml'), manifest('swap', shorthand('swap', swap, mp('swap'))));
    const first = await startAgent(t, d);
    await ready(first, 'gone', false);
    await ready(first, 'swap', false);
    first.proc.kill('SIGKILL');
    await first.exited;
    // While no agent runs: one manifest goes, one image is replaced by another file.
    rmSync(join(d.manifests, 'gone.yaml'));
    const other = mk('other', 0x33);
    renameSync(other, swap);
    const second = await startAgent(t, d);
    await ready(second, 'swap', false);
    assert.equal(mountIdAt(join(d.images, 'gone.raw')), undefined, 'the unwanted kept mount is unmounted');
    // (Not compared by mount id: the kernel hands a freed mount id to the next mount, and did in CI.)
    // Read from a child process: the new image's bytes, not the old one's.
    const r = run('od', ['-An', '-tx1', '-N4', join(d.images, 'swap.raw')]);
    assert.equal(r.stdout.trim(), '33 33 33 33');
    await logMatches(second, /unmounting a kept export no manifest wants.*gone/);
    await logMatches(second, /the image under a kept mount was replaced; unmounting it and mounting anew/);
  });
});
