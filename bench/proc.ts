/**
 * Child processes and the kernel's mount table, as the benchmark needs them.
 * Short-lived tools (fio, qemu-img) are tracked so an abort can kill them;
 * servers run in their own process group, so Ctrl-C does not reach them and
 * the cleanup steps stop them in order (flush, unmount) instead.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { BlkError } from '../src/errors.js';

export interface CommandResult {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

const live = new Set<ChildProcess>();

/**
 * Runs a command to completion (killed after timeoutMs); never rejects on a non-zero exit.
 * `server: true` runs it in its own process group and leaves it out of killAbortable().
 */
export function runCommand(
  cmd: string,
  args: string[],
  opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv; server?: boolean } = {},
): Promise<CommandResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: opts.env ?? process.env,
      detached: opts.server === true,
    });
    if (!opts.server) live.add(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    const timer =
      opts.timeoutMs === undefined ? undefined : setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      live.delete(child);
      reject(new BlkError('IO', `cannot run ${cmd}: ${e.message}`, {}, { cause: e }));
    });
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      live.delete(child);
      resolve({
        status,
        signal,
        stdout: Buffer.concat(out).toString(),
        stderr: Buffer.concat(err).toString(),
      });
    });
  });
}

/** Starts a long-running server in its own process group (its owner stops it); stderr is kept. */
export function startServer(cmd: string, args: string[]): { child: ChildProcess; stderr: () => string } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], detached: true });
  const err: Buffer[] = [];
  child.stderr?.on('data', (b: Buffer) => err.push(b));
  child.on('error', (e) => err.push(Buffer.from(`cannot start ${cmd}: ${e.message}\n`)));
  return { child, stderr: () => Buffer.concat(err).toString() };
}

/** Sends SIGKILL to every running tool (fio, qemu-img), not to servers: the first step of an abort. */
export function killAbortable(): void {
  for (const c of live) c.kill('SIGKILL');
}

/** Waits until `child` has exited, or `ms` elapsed; true when it exited. */
export async function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return true;
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    child.once('close', () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

function unescapeMountPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8)));
}

/** The mount points of this mount namespace (from /proc/self/mountinfo). */
export async function mountPoints(): Promise<string[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  return text
    .split('\n')
    .filter(Boolean)
    .map((line) => unescapeMountPath(line.split(' ')[4] ?? ''));
}

/** True when something is mounted exactly on `path`. */
export async function isMounted(path: string): Promise<boolean> {
  return (await mountPoints()).includes(path);
}

/** Polls `check` every `everyMs` (default 50) until it returns true; throws a BlkError naming `what` after timeoutMs. */
export async function waitUntil(
  check: () => Promise<boolean>,
  timeoutMs: number,
  what: string,
  everyMs = 50,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline)
      throw new BlkError('MOUNT_FAILED', `timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** Lazily unmounts `path` when it is still mounted (a leftover of a crashed or killed server). */
export async function unmountIfMounted(path: string): Promise<void> {
  if (!(await isMounted(path))) return;
  await runCommand('umount', ['-l', path], { timeoutMs: 30_000 });
}

/** User + system CPU seconds of a process, all its threads (/proc/PID/stat; clock ticks of 1/100 s). */
export async function cpuSeconds(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may contain spaces) start at ") ": utime and stime are fields 14 and 15.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** Resident memory of a process in MiB (VmRSS from /proc/PID/status). */
export async function rssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) / 1024;
}
