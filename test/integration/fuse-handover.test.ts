/**
 * Handing a live FUSE connection to a successor process (native-fuse's own
 * request loop, src/export/fuse/fuse3.ts connection() / adoptFileFsFuse3).
 * Real mounts, real processes (fuse-handover-child.ts): a server generation
 * passes a dup of its /dev/fuse descriptor and its INIT to a successor, stops
 * answering, and is SIGKILLed while a reader and a writer wait on requests it
 * read; the successor asks the kernel to resend them (FUSE_NOTIFY_RESEND,
 * Linux 6.9+). Without the resend, the request the dead server held is lost:
 * its reader waits until the connection is aborted. The test process never
 * reads the mount itself except through child processes.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fuse3Unavailable } from '../../src/export/fuse/fuse3.js';
import { cleanupMountsUnder, mountsUnder } from '../helpers/mounts.js';
import { needTools, run, tempDir } from '../helpers/tools.js';
import { BLOCK, blockPattern, type LoopConfig, MiB, type ServeConfig } from './fuse-handover-child.js';

const CHILD = new URL('./fuse-handover-child.ts', import.meta.url).pathname;
const SIZE = 8 * MiB;
const READ_REGION = 4 * MiB; // [0, 4 MiB) seeded and only read; [4 MiB, 8 MiB) the writer's

/** Lines a process (and, for generation 0, every successor sharing its stdout) printed, with waiting. */
class Lines {
  readonly all: string[] = [];
  private waiters: (() => void)[] = [];
  constructor(child: ChildProcess) {
    let rest = '';
    const take = (d: Buffer) => {
      rest += d.toString();
      const parts = rest.split('\n');
      rest = parts.pop()!;
      this.all.push(...parts);
      for (const w of this.waiters.splice(0)) w();
    };
    child.stdout!.on('data', take);
    child.stderr!.on('data', take);
  }
  /** The last line matching `re`, waiting up to `ms` for one to come. */
  async wait(re: RegExp, ms: number, what = String(re)): Promise<RegExpExecArray> {
    const deadline = Date.now() + ms;
    for (;;) {
      for (let i = this.all.length - 1; i >= 0; i--) {
        const m = re.exec(this.all[i]!);
        if (m) return m;
      }
      const left = deadline - Date.now();
      if (left <= 0)
        throw new Error(`timed out waiting for ${what}; output:\n${this.all.slice(-30).join('\n')}`);
      await Promise.race([new Promise<void>((r) => this.waiters.push(r)), sleep(Math.min(left, 200))]);
    }
  }
  /** The highest count a loop ("reader n=40") reported so far. */
  count(role: string): number {
    let n = 0;
    for (const l of this.all) {
      const m = new RegExp(`^${role} n=(\\d+)$`).exec(l);
      if (m) n = Math.max(n, Number(m[1]));
    }
    return n;
  }
}

/**
 * Every process a test starts, killed when it ends (also on failure), after
 * the connections under its directory are aborted: a process waiting on a
 * request that a dead server held can only be released by an abort.
 */
class Procs {
  private pids = new Set<number>();
  readonly dir: string;
  constructor(t: TestContext) {
    this.dir = tempDir(t, 'blkexport-handover-', (dir) => {
      for (const m of mountsUnder(dir)) run('umount', ['-f', m.mountpoint], { timeoutMs: 10_000 });
      for (const pid of this.pids) this.kill(pid, 'SIGKILL');
      cleanupMountsUnder(dir);
    });
  }
  start(role: string, cfg: ServeConfig | LoopConfig): { child: ChildProcess; lines: Lines } {
    const child = spawn(process.execPath, ['--import', 'tsx', CHILD, role, JSON.stringify(cfg)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    if (child.pid) this.pids.add(child.pid);
    return { child, lines: new Lines(child) };
  }
  track(pid: number): void {
    this.pids.add(pid);
  }
  kill(pid: number, signal: NodeJS.Signals): void {
    try {
      process.kill(pid, signal);
    } catch {
      // already gone
    }
  }
}

/** The seeded image and an empty regular file to mount on. */
function makeImage(dir: string): { img: string; mnt: string } {
  const img = join(dir, 'disk.img');
  const mnt = join(dir, 'mnt');
  const data = Buffer.alloc(SIZE);
  for (let i = 0; i < READ_REGION / BLOCK; i++) blockPattern(i, 0).copy(data, i * BLOCK);
  writeFileSync(img, data);
  writeFileSync(mnt, '');
  return { img, mnt };
}

function exited(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => child.on('exit', (code) => resolve(code)));
}

/** Under CI=true a kernel without FUSE_NOTIFY_RESEND fails the test; elsewhere it skips it. */
function needResend(t: TestContext, offered: boolean): boolean {
  if (offered) return true;
  const why = 'the kernel does not offer FUSE_HAS_RESEND (Linux 6.9+)';
  if (process.env.CI === 'true') assert.fail(why);
  t.skip(why);
  return false;
}

/** Fails under CI=true (skips elsewhere) when the libfuse 3 addon is not built. */
function needAddon(t: TestContext): boolean {
  const why = fuse3Unavailable();
  if (!why) return true;
  if (process.env.CI === 'true') assert.fail(`the libfuse 3 binding is not built: ${why}`);
  t.skip(`the libfuse 3 binding is not built: ${why}`);
  return false;
}

interface LoopSummary {
  n: number;
  errors: number;
  mismatches: number;
  firstErrors: string[];
  versions?: Record<string, number>;
}

async function summary(lines: Lines, role: string): Promise<LoopSummary> {
  const m = await lines.wait(new RegExp(`^(\\{"role":"${role}".*)$`), 20_000, `${role}'s summary`);
  return JSON.parse(m[1]!) as LoopSummary;
}

describe('FUSE connection handover', { concurrency: false }, () => {
  test('5 handovers in a row under a reader and a writer: the successor adopts, the kernel resends what the killed server held, no error', {
    timeout: 240_000,
  }, async (t) => {
    if (!needTools(t, '/dev/fuse', 'umount') || !needAddon(t)) return;
    const procs = new Procs(t);
    const { img, mnt } = makeImage(procs.dir);
    const stop = join(procs.dir, 'stop');
    const serveCfg: ServeConfig = { mnt, img, gen: 0, resend: true, fastBytes: MiB, init: undefined };
    const gen0 = procs.start('serve', serveCfg);
    const servers = gen0.lines; // every generation writes to generation 0's stdout
    let pid = Number((await servers.wait(/^gen=0 serving pid=(\d+)$/, 20_000))[1]);
    const reader = procs.start('reader', { path: mnt, stop, from: 0, to: READ_REGION, seed: 11 });
    const writer = procs.start('writer', { path: mnt, stop, from: READ_REGION, to: SIZE, seed: 12 });
    await reader.lines.wait(/^reader n=40$/, 20_000);
    await writer.lines.wait(/^writer n=20$/, 20_000);

    for (let gen = 0; gen < 5; gen++) {
      procs.kill(pid, 'SIGUSR2'); // start the successor, then hold every request
      const hand = await servers.wait(
        new RegExp(`^gen=${gen} handing-over successor=(\\d+) kernelResend=(\\w+)$`),
        10_000,
      );
      procs.track(Number(hand[1]));
      if (!needResend(t, hand[2] === 'true')) return;
      await servers.wait(new RegExp(`^gen=${gen + 1} waiting pid=\\d+$`), 20_000);
      // Both loops are waiting on a request this server read and will never answer.
      await servers.wait(new RegExp(`^held=2 gen=${gen}$`), 20_000, `generation ${gen} holding 2 requests`);
      const before = { r: reader.lines.count('reader'), w: writer.lines.count('writer') };
      procs.kill(pid, 'SIGKILL');
      pid = Number((await servers.wait(new RegExp(`^gen=${gen + 1} serving pid=(\\d+)$`), 20_000))[1]);
      await reader.lines.wait(
        new RegExp(`^reader n=(${before.r + 40})$`),
        20_000,
        `reader past ${before.r + 40}`,
      );
      await writer.lines.wait(
        new RegExp(`^writer n=(${before.w + 20})$`),
        20_000,
        `writer past ${before.w + 20}`,
      );
    }

    writeFileSync(stop, '');
    const r = await summary(reader.lines, 'reader');
    const w = await summary(writer.lines, 'writer');
    assert.deepEqual([r.errors, r.mismatches, r.firstErrors], [0, 0, []], 'reader');
    assert.deepEqual([w.errors, w.mismatches, w.firstErrors], [0, 0, []], 'writer');
    assert.ok(r.n > 200 && w.n > 100, `reads ${r.n}, writes ${w.n}`);

    // The last successor serves reads of [0, 1 MiB) natively, in the workers of its adopted connection.
    procs.kill(pid, 'SIGTERM');
    const fast = JSON.parse((await servers.wait(/^gen=5 fast=(.*)$/, 10_000))[1]!) as { reads: number };
    assert.ok(fast.reads > 0, `fast-path reads in generation 5: ${fast.reads}`);
    await servers.wait(/^gen=5 unmounted$/, 20_000);
    await servers.wait(/^gen=5 ended$/, 20_000); // the connection is gone: the loop saw ENODEV
    assert.deepEqual(mountsUnder(procs.dir), []);

    // Every acknowledged write reached the image; the read-only half is as seeded.
    const disk = readFileSync(img);
    for (let i = 0; i < READ_REGION / BLOCK; i++)
      assert.ok(disk.subarray(i * BLOCK, (i + 1) * BLOCK).equals(blockPattern(i, 0)), `seeded block ${i}`);
    for (const [block, version] of Object.entries(w.versions!)) {
      const i = Number(block);
      assert.ok(
        disk.subarray(i * BLOCK, (i + 1) * BLOCK).equals(blockPattern(i, version)),
        `written block ${i}`,
      );
    }
    assert.equal(await exited(gen0.child), null, 'generation 0 was killed');
  });

  test('without resend (kernels before 6.9) the request the killed server held is lost: its reader waits until the connection is aborted', {
    timeout: 120_000,
  }, async (t) => {
    if (!needTools(t, '/dev/fuse', 'umount', 'dd') || !needAddon(t)) return;
    const procs = new Procs(t);
    const { img, mnt } = makeImage(procs.dir);
    const stop = join(procs.dir, 'stop');
    const gen0 = procs.start('serve', {
      mnt,
      img,
      gen: 0,
      resend: false,
      fastBytes: 0,
    } satisfies ServeConfig);
    const servers = gen0.lines;
    const pid0 = Number((await servers.wait(/^gen=0 serving pid=(\d+)$/, 20_000))[1]);
    const reader = procs.start('reader', { path: mnt, stop, from: 0, to: READ_REGION, seed: 21 });
    await reader.lines.wait(/^reader n=40$/, 20_000);

    procs.kill(pid0, 'SIGUSR2');
    procs.track(Number((await servers.wait(/^gen=0 handing-over successor=(\d+)/, 10_000))[1]));
    await servers.wait(/^gen=1 waiting pid=\d+$/, 20_000);
    await servers.wait(/^held=1 gen=0$/, 20_000);
    procs.kill(pid0, 'SIGKILL');
    await servers.wait(/^gen=1 serving pid=\d+$/, 20_000);

    // The successor serves new requests...
    const out = join(procs.dir, 'probe.bin');
    const probe = run('dd', [`if=${mnt}`, `of=${out}`, 'bs=64k', 'count=1', 'iflag=direct', 'status=none'], {
      timeoutMs: 10_000,
    });
    assert.equal(probe.status, 0, probe.stderr);
    const want = Buffer.concat(Array.from({ length: 16 }, (_, i) => blockPattern(i, 0)));
    assert.ok(readFileSync(out).equals(want), 'a new read through the successor');
    // ...but the reader's request, read by the dead server and never resent, gets no answer.
    const n = reader.lines.count('reader');
    await sleep(3000);
    assert.equal(reader.lines.count('reader'), n, 'the reader made no progress');
    const state = readFileSync(`/proc/${reader.child.pid}/stat`, 'utf8').split(') ')[1]![0];
    assert.equal(state, 'D', 'the reader waits uninterruptibly on its request');

    // Aborting the connection (umount -f) answers it ECONNABORTED; the successor's loop ends (ENODEV).
    run('umount', ['-f', mnt], { timeoutMs: 10_000 });
    await reader.lines.wait(/^reader error ECONNABORTED$/, 10_000);
    await servers.wait(/^gen=1 ended$/, 10_000);
    writeFileSync(stop, '');
    const r = await summary(reader.lines, 'reader');
    assert.equal(r.firstErrors[0], 'ECONNABORTED');
    assert.equal(r.mismatches, 0);
  });
});
