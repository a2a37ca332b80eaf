/**
 * The life of the one qemu-storage-daemon (QSD) per host: its files under a
 * runtime directory (pidfile, QMP socket, our state file), starting it
 * daemonized, finding the one already running, and stopping it.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BlkError } from '../../errors.js';

/** Where the agent keeps QSD's files unless told otherwise (--qsd-dir). */
export const DEFAULT_QSD_DIR = '/run/blkexport';

/** The QSD binary: $BLKEXPORT_QSD, else qemu-storage-daemon on PATH. */
export function qsdBinary(): string {
  return process.env.BLKEXPORT_QSD || 'qemu-storage-daemon';
}

/** The files of one QSD instance. */
export interface QsdPaths {
  dir: string;
  pidfile: string;
  qmp: string;
  /** The manifest options of every node and export we applied (see state.ts). */
  state: string;
}

/** The files of the QSD managed under `dir` (made absolute: QSD chdir()s to / when it daemonizes). */
export function qsdPaths(dir: string): QsdPaths {
  const d = resolve(dir);
  return { dir: d, pidfile: join(d, 'qsd.pid'), qmp: join(d, 'qsd.qmp'), state: join(d, 'qsd.state.json') };
}

/** True when `pid` is alive (or exists under another user). */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The pid of the QSD started for `paths` when it still runs (its pidfile names a live QSD on our QMP socket). */
export async function runningQsd(paths: QsdPaths): Promise<number | undefined> {
  let pid: number;
  try {
    pid = Number.parseInt((await readFile(paths.pidfile, 'utf8')).trim(), 10);
  } catch {
    return undefined;
  }
  if (!Number.isInteger(pid) || pid <= 0 || !isAlive(pid)) return undefined;
  try {
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0');
    if (argv.some((a) => a.includes('qemu-storage-daemon')) && argv.some((a) => a.includes(paths.qmp)))
      return pid;
  } catch {
    // gone meanwhile
  }
  return undefined;
}

/**
 * Starts QSD daemonized with a QMP monitor on `paths.qmp`; resolves with its
 * pid once the parent has exited 0 (QSD's parent exits only when the child
 * is set up, with its status) and the pidfile names it.
 */
export async function startQsd(paths: QsdPaths): Promise<number> {
  await mkdir(paths.dir, { recursive: true, mode: 0o700 });
  await rm(paths.qmp, { force: true });
  const args = [
    '--daemonize',
    '--pidfile',
    paths.pidfile,
    '--chardev',
    `socket,id=qmp,path=${paths.qmp},server=on,wait=off`,
    '--monitor',
    'chardev=qmp',
  ];
  const bin = qsdBinary();
  const out = await new Promise<{ code: number | null; stderr: string }>((res, rej) => {
    const p = spawn(bin, args, { stdio: ['ignore', 'ignore', 'pipe'], cwd: '/' });
    let stderr = '';
    p.stderr!.setEncoding('utf8');
    p.stderr!.on('data', (d: string) => {
      stderr += d;
    });
    p.on('error', (e: NodeJS.ErrnoException) =>
      rej(new BlkError('AGENT', `cannot run ${bin}: ${e.code ?? e.message}`, {}, { cause: e })),
    );
    p.on('exit', (code) => res({ code, stderr }));
  });
  if (out.code !== 0) {
    throw new BlkError(
      'AGENT',
      `${bin} exited ${out.code} while starting: ${out.stderr.trim() || 'no message'}`,
    );
  }
  for (let i = 0; i < 100; i++) {
    const pid = await runningQsd(paths);
    if (pid !== undefined) return pid;
    await sleep(20);
  }
  throw new BlkError('AGENT', `${bin} started but ${paths.pidfile} names no running daemon`);
}

/** Waits until `pid` has exited; SIGKILL after `timeoutMs`. */
export async function waitExit(pid: number, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (isAlive(pid) && !isZombie(pid)) {
    if (Date.now() > deadline) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
      return;
    }
    await sleep(20);
  }
}

function isZombie(pid: number): boolean {
  try {
    // /proc/<pid>/stat is "pid (comm) S ...": state Z is a zombie nobody has reaped yet.
    return /\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return true;
  }
}
