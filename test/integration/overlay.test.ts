/**
 * Ephemeral overlays end to end (`blkexport mount --overlay`, `overlay:
 * ephemeral` in manifests): writes are seen through the export and never
 * reach the image (checksum and `qemu-img compare` against a copy); the
 * overlay file is gone when the export is; it works while a writer (QSD)
 * holds the image; a full overlay directory answers ENOSPC and leaves a
 * consistent overlay; a killed agent's leftover is deleted at the next start
 * while an adopted export keeps its overlay and what was written to it.
 * Real FUSE mounts, real images from qemu-img, every read and write from a
 * child process.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { type AgentHandle, agentDir, startAgent, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { cleanupMountsUnder, mountsUnder, readExport } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, randomBytes, run, runOk, seededRandom, tempDir } from '../helpers/tools.js';

const TOOLS = ['qemu-img', 'qemu-io', 'qemu-storage-daemon', '/dev/fuse', 'dd'];
const SIZE = 16 << 20;

function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** A qcow2 of SIZE bytes with seeded data in its first 4 MiB; returns the image and its raw content. */
function makeImage(dir: string, name: string, seed: number): { img: string; raw: Buffer } {
  const raw = Buffer.alloc(SIZE);
  randomBytes(seededRandom(seed), 4 << 20).copy(raw);
  const src = join(dir, `${name}.src`);
  writeFileSync(src, raw);
  const img = join(dir, `${name}.qcow2`);
  qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', src, img);
  runOk('rm', [src]);
  return { img, raw };
}

/** Writes `data` at `offset` of `path` from a child process (dd, no truncation, fsync). */
function writeAt(dir: string, path: string, offset: number, data: Buffer) {
  const src = join(dir, `patch-${offset}`);
  writeFileSync(src, data);
  return run('dd', [
    `if=${src}`,
    `of=${path}`,
    'bs=64K',
    `seek=${offset}`,
    `count=${data.length}`,
    'iflag=count_bytes',
    'oflag=seek_bytes',
    'conv=notrunc,fsync',
    'status=none',
  ]);
}

function blk(...args: string[]) {
  return run(BIN, args, { timeoutMs: 60_000 });
}

/** Files in `dir` (empty when it does not exist). */
function filesIn(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir).sort() : [];
}

/** Starts qemu-storage-daemon holding `img` open read-write (a running VM's locks); waits until it does. */
async function startWriter(t: { after(fn: () => void | Promise<void>): void }, img: string): Promise<void> {
  const qsd: ChildProcess = spawn(
    'qemu-storage-daemon',
    [
      '--blockdev',
      `driver=file,node-name=f,filename=${img}`,
      '--blockdev',
      'driver=qcow2,node-name=q,file=f',
    ],
    { stdio: 'ignore' },
  );
  const exited = new Promise((r) => qsd.on('exit', r));
  t.after(async () => {
    qsd.kill('SIGTERM');
    await Promise.race([exited, sleep(5000)]);
  });
  await until('qemu-storage-daemon to hold the image writable', () => {
    const r = run('qemu-img', ['info', img]);
    return r.status !== 0 && /Failed to get shared "write" lock/.test(r.stderr);
  });
}

describe('ephemeral overlays', { concurrency: false }, () => {
  test('mount --overlay beside a writer: writes seen, image byte-identical, no overlay file left', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = tempDir(t, 'blkexport-overlay-', cleanupMountsUnder);
    const { img, raw } = makeImage(dir, 'golden', 1);
    const ref = join(dir, 'ref.qcow2');
    copyFileSync(img, ref);
    const before = sha256(img);
    await startWriter(t, img);
    // Without --overlay the image cannot even be opened read-only: the writer refuses others' readers' locks.
    const plain = blk('mount', img, join(dir, 'plain.raw'), '--create-mountpoint', '--daemonize');
    assert.notEqual(plain.status, 0);
    assert.match(plain.stderr, /Failed to get shared "write" lock/);

    const od = join(dir, 'overlays');
    mkdirSync(od);
    const mp = join(dir, 'view.raw');
    const m = blk('mount', img, mp, '--overlay', '--overlay-dir', od, '--create-mountpoint', '--daemonize');
    assert.equal(m.status, 0, m.stderr);
    assert.match(m.stdout, /writable into a throwaway overlay in .*overlays \(the image is not written\)/);
    const pid = Number(/\(pid (\d+)\)/.exec(m.stdout)![1]);
    // The overlay's name is gone at once; the serving process holds the file open.
    assert.deepEqual(filesIn(od), []);
    const held = readdirSync(`/proc/${pid}/fd`)
      .map((fd) => {
        try {
          return readlinkSync(`/proc/${pid}/fd/${fd}`);
        } catch {
          return '';
        }
      })
      .filter((l) => l.startsWith(`${od}/blkexport-overlay-`));
    assert.ok(held.length > 0 && held.every((l) => l.endsWith(' (deleted)')), held.join('\n'));

    // Unaligned writes inside data and past it: the rest of each cluster comes from the image.
    const expected = Buffer.from(raw);
    const rand = seededRandom(7);
    for (const [off, len] of [
      [1000, 3000],
      [(2 << 20) + 65_000, 70_000],
      [(10 << 20) + 5, 4096],
    ] as const) {
      const data = randomBytes(rand, len);
      const w = writeAt(dir, mp, off, data);
      assert.equal(w.status, 0, w.stderr);
      data.copy(expected, off);
    }
    assert.ok(readExport(mp).equals(expected), 'the export reads what was written, over the image');

    const u = blk('umount', mp);
    assert.equal(u.status, 0, u.stderr);
    assert.equal(mountsUnder(dir).length, 0);
    assert.deepEqual(filesIn(od), []);
    assert.equal(sha256(img), before, 'the image file is byte-identical');
    assert.equal(run('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', ref, img]).status, 0);
  });

  test('a full overlay directory answers ENOSPC; the overlay stays consistent and the image untouched', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = tempDir(t, 'blkexport-overlay-', cleanupMountsUnder);
    const { img, raw } = makeImage(dir, 'small', 2);
    const before = sha256(img);
    const od = join(dir, 'tiny');
    mkdirSync(od);
    runOk('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', od]);
    t.after(() => {
      run('umount', ['-l', od]);
    });
    const mp = join(dir, 'view.raw');
    const m = blk('mount', img, mp, '--overlay', '--overlay-dir', od, '--create-mountpoint', '--daemonize');
    assert.equal(m.status, 0, m.stderr);
    const pid = Number(/\(pid (\d+)\)/.exec(m.stdout)![1]);
    // force-share refuses nobody anything: a VM could start on the image now (qemu-io opens it read-write).
    const vm = run('qemu-io', ['-c', 'read 0 4k', img]);
    assert.equal(vm.status, 0, vm.stderr);
    assert.doesNotMatch(vm.stdout + vm.stderr, /lock/);

    // 1 MiB into the first MiB fits (clusters of 64 KiB, tables): 4 MiB more cannot.
    const small = randomBytes(seededRandom(3), 256 << 10);
    assert.equal(writeAt(dir, mp, 0, small).status, 0);
    const big = randomBytes(seededRandom(4), 4 << 20);
    const full = writeAt(dir, mp, 8 << 20, big);
    assert.notEqual(full.status, 0, 'the writer is told');
    assert.match(full.stderr, /No space left on device/);
    // The export still serves: what was written before reads back, the image's bytes around it too.
    const view = readExport(mp);
    assert.ok(view.subarray(0, small.length).equals(small));
    assert.ok(view.subarray(small.length, 4 << 20).equals(raw.subarray(small.length, 4 << 20)));
    // The overlay itself (through the serving process's descriptor) is a consistent qcow2.
    const fd = readdirSync(`/proc/${pid}/fd`).find((f) => {
      try {
        return readlinkSync(`/proc/${pid}/fd/${f}`).startsWith(`${od}/blkexport-overlay-`);
      } catch {
        return false;
      }
    });
    assert.ok(fd !== undefined);
    // qemu-img check exits 0 (clean) or 3 (leaked clusters only: an allocation the full disk cut short
    // may leak, as QEMU's may); 2 would be corruption.
    const check = run('qemu-img', ['check', '-U', '-f', 'qcow2', `/proc/${pid}/fd/${fd}`]);
    assert.ok(check.status === 0 || check.status === 3, check.stdout + check.stderr);
    assert.doesNotMatch(check.stdout, /corruption|ERROR/);

    assert.equal(blk('umount', mp).status, 0);
    assert.deepEqual(filesIn(od), []);
    assert.equal(sha256(img), before);
  });
});

function manifest(name: string, body: string): string {
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata: { name: ${name} }\nspec:\n  exports:\n${body}`;
}

interface Status {
  exports: { id: string; state: string; adopted?: boolean }[];
}

async function ready(agent: AgentHandle, id: string, adopted: boolean): Promise<void> {
  await until(
    `${id} ready${adopted ? ' (adopted)' : ''}`,
    async () => {
      const e = (await agent.get<Status>('/status')).exports.find((x) => x.id === id);
      return e?.state === 'ready' && (e.adopted ?? false) === adopted;
    },
    20_000,
  );
}

/** An overlay export of a fresh image on `<name>.raw`, in the agent's directories. */
function overlayExport(d: { dir: string; images: string; manifests: string }, name: string, seed: number) {
  const { img, raw } = makeImage(d.images, name, seed);
  const mnt = join(d.images, `${name}.raw`);
  const body = shorthand(name, img, { overlay: 'ephemeral', mountpoint: mnt, 'create-mountpoint': true });
  writeFileSync(join(d.manifests, `${name}.yaml`), manifest(name, body));
  return { img, raw, mnt, sum: sha256(img) };
}

describe('ephemeral overlays in the agent', { concurrency: false }, () => {
  test('the overlay lives in --overlay-dir while the export does, and goes with it', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const ovl = join(d.dir, 'ovl');
    const a = overlayExport(d, 'golden', 5);
    const agent = await startAgent(t, d, ['--overlay-dir', ovl]);
    await ready(agent, 'golden', false);
    const files = filesIn(ovl);
    assert.equal(files.length, 1);
    assert.match(files[0]!, /^blkexport-overlay-golden-[0-9a-f]{16}\.qcow2$/);
    const data = randomBytes(seededRandom(9), 100_000);
    assert.equal(writeAt(d.dir, a.mnt, 12_345, data).status, 0);
    const view = readExport(a.mnt);
    assert.ok(view.subarray(12_345, 12_345 + data.length).equals(data));
    assert.ok(view.subarray(0, 12_345).equals(a.raw.subarray(0, 12_345)));

    runOk('rm', [join(d.manifests, 'golden.yaml')]);
    await until('the export unmounted', () => mountsUnder(d.images).length === 0, 20_000);
    // The overlay is deleted in the same step, right after the unmount.
    await until('the overlay deleted', () => filesIn(ovl).length === 0, 5000);
    assert.equal(sha256(a.img), a.sum);
  });

  test("a killed agent's leftover overlay is deleted at the next start; an adopted export keeps its overlay and data", async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const ovl = join(d.dir, 'ovl');
    const keep = overlayExport(d, 'keep', 11);
    const lose = overlayExport(d, 'lose', 12);
    const first = await startAgent(t, d, ['--overlay-dir', ovl]);
    await ready(first, 'keep', false);
    await ready(first, 'lose', false);
    const kd = randomBytes(seededRandom(13), 70_000);
    const ld = randomBytes(seededRandom(14), 70_000);
    assert.equal(writeAt(d.dir, keep.mnt, 4096, kd).status, 0);
    assert.equal(writeAt(d.dir, lose.mnt, 4096, ld).status, 0);
    const [keepFile, loseFile] = ['keep', 'lose'].map((n) => filesIn(ovl).find((f) => f.includes(`-${n}-`))!);
    assert.ok(keepFile && loseFile, filesIn(ovl).join(', '));
    // Not ours to delete: a file of another name in the directory.
    writeFileSync(join(ovl, 'notes.txt'), 'someone else\n');

    first.proc.kill('SIGKILL');
    await first.exited;
    // lose's mount goes while no agent runs: the fd holder's entry for it has no mount any more,
    // so its overlay is a leftover of a dead agent.
    runOk('umount', ['-l', lose.mnt]);

    const second = await startAgent(t, d, ['--overlay-dir', ovl]);
    await ready(second, 'keep', true);
    await ready(second, 'lose', false);
    assert.ok(!existsSync(join(ovl, loseFile)), 'the leftover is deleted');
    assert.match(second.log(), new RegExp(`deleted the overlay file a previous agent left.*${loseFile}`));
    assert.ok(existsSync(join(ovl, keepFile)), 'the adopted export keeps its overlay');
    assert.ok(existsSync(join(ovl, 'notes.txt')), 'other names are left alone');
    const kv = readExport(keep.mnt);
    assert.ok(
      kv.subarray(4096, 4096 + kd.length).equals(kd),
      'what was written before the kill is still there',
    );
    // lose is mounted anew, over a fresh overlay: the image's bytes.
    assert.ok(
      readExport(lose.mnt)
        .subarray(4096, 4096 + ld.length)
        .equals(lose.raw.subarray(4096, 4096 + ld.length)),
    );

    second.proc.kill('SIGTERM');
    assert.equal(await second.exited, 0);
    assert.deepEqual(filesIn(ovl), ['notes.txt'], 'a stop deletes every overlay');
    assert.equal(sha256(keep.img), keep.sum);
    assert.equal(sha256(lose.img), lose.sum);
  });
});
