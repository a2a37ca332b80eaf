/**
 * Helpers for tests that run qemu-storage-daemon (QSD): clean-up registered
 * before anything starts (QSD killed by its pidfile's pid, mounts lazily
 * unmounted), byte reads from another process, and the mount id of a path.
 */
import { type ChildProcess, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseMountInfo } from '../../src/export/mount-table.js';
import { type AgentHandle, agentDir, startAgent } from '../helpers/agent.js';
import { cleanupMountsUnder } from '../helpers/mounts.js';

export { readExport } from '../helpers/mounts.js';

/** The tools every QSD test needs (under CI=true missing ones fail the test). */
export const QSD_TOOLS = ['qemu-storage-daemon', 'qemu-img', '/dev/fuse'];

/** The pid in `<qsdDir>/qsd.pid` when it names a live qemu-storage-daemon. */
export function qsdPid(qsdDir: string): number | undefined {
  try {
    const pid = Number.parseInt(readFileSync(join(qsdDir, 'qsd.pid'), 'utf8').trim(), 10);
    const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return cmd.includes('qemu-storage-daemon') ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** SIGKILLs the QSD of `qsdDir` (by its pidfile) and waits until it is gone. */
export function killQsd(qsdDir: string): number | undefined {
  const pid = qsdPid(qsdDir);
  if (pid === undefined) return undefined;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return pid;
  }
  for (let i = 0; i < 200 && qsdPid(qsdDir) === pid; i++) spawnSync('sleep', ['0.02']);
  return pid;
}

/**
 * Registers clean-up before anything starts: stops the agents of `agents()`
 * (SIGTERM, then SIGKILL: an agent would restart a QSD killed under it),
 * kills the QSD of `qsdDir()` by its pidfile, then unmounts whatever is left
 * under `root()`. Call it before the test directory's own clean-up is
 * registered: hooks run in order, and the pidfile must still exist.
 */
export function cleanupQsd(
  t: { after(fn: () => void | Promise<void>): void },
  qsdDir: () => string | undefined,
  root: () => string | undefined,
  agents: () => ChildProcess[] = () => [],
): void {
  t.after(async () => {
    for (const p of agents()) {
      if (p.exitCode !== null || p.signalCode !== null) continue;
      const exited = new Promise((resolve) => p.once('exit', resolve));
      p.kill('SIGTERM');
      await Promise.race([exited, sleep(5000)]);
      if (p.exitCode === null && p.signalCode === null) {
        p.kill('SIGKILL');
        await exited;
      }
    }
    const q = qsdDir();
    const r = root();
    if (q !== undefined) killQsd(q);
    if (r !== undefined) cleanupMountsUnder(r);
  });
}

/** The guest-visible bytes of an image, by qemu-img convert (the oracle). */
export function convertToRaw(image: string, out: string, format?: string): Buffer {
  const args = ['convert', '-U', ...(format ? ['-f', format] : []), '-O', 'raw', image, out];
  const r = spawnSync('qemu-img', args);
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr.toString()}`);
  return readFileSync(out);
}

/** The topmost mount on `path` in this process's mount table. */
export function mountAt(path: string): { mountId: number; fstype: string; source: string } | undefined {
  let top: { mountId: number; fstype: string; source: string } | undefined;
  for (const e of parseMountInfo(readFileSync('/proc/self/mountinfo', 'utf8')))
    if (e.mountpoint === path) top = e;
  return top;
}

/**
 * A test directory with QSD clean-up registered first, and `start(engine)`
 * starting an agent whose default engine is `engine` and whose QSD lives in
 * the test directory.
 */
export function qsdAgentSetup(
  t: Parameters<typeof agentDir>[0] & { after(fn: () => void | Promise<void>): void },
  defaultEngine: 'native' | 'qemu' = 'qemu',
) {
  let root: string | undefined;
  const agents: AgentHandle[] = [];
  cleanupQsd(
    t,
    () => root && join(root, 'qsd'),
    () => root,
    () => agents.map((a) => a.proc),
  );
  const d = agentDir(t);
  root = d.dir;
  const qsdDir = join(d.dir, 'qsd');
  const start = async (engine: string = defaultEngine, extra: string[] = []) => {
    const a = await startAgent(t, d, ['--engine', engine, '--qsd-dir', qsdDir, ...extra]);
    agents.push(a);
    return a;
  };
  return { d, qsdDir, start };
}
