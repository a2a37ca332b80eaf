/**
 * Which agent mounts are still alive although the agent that made them is
 * gone. A kept mount names, in its source, the pid of the agent that mounted
 * it (`blkexport-agent:<pid>`), and keeps that name after the agent died and
 * a successor adopted it; its connection lives on in an fd holder. The stale
 * mount cleaning at an agent's start spares the mounts its own holder keeps,
 * but another agent's holder (another manifest directory and --fdstore on
 * the same host, or another test) is unknown to it: by the pid alone, such a
 * live mount looks stale. The kernel knows better: a FUSE connection lives
 * while one descriptor of it is open, in any process (an agent, a holder).
 * Where the kernel names each /dev/fuse descriptor's connection in
 * /proc/<pid>/fdinfo (`fuse_connection`, the minor of the mount's device), a
 * descriptor found there proves the mount alive without touching it. Any
 * other mount is asked: a connection whose descriptors are all closed is
 * aborted and answers ENOTCONN at once; a kept one answers, or waits for its
 * next server.
 */
import { execFile } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { type MountEntry, mountOwner, readMountTable } from '../../export/mount-table.js';

/** How long a probe may wait for an answer; a mount still waiting then is kept (its next server is on the way). */
const PROBE_MS = 5000;

/**
 * statfs(2) of the path in a child process (a mount whose server is away
 * blocks the caller until its next server answers: never here, never in the
 * thread pool). Exit 3: ENOTCONN (ECONNABORTED when the abort came while
 * it waited), 0: answered, 4: another error.
 */
const PROBE = `try { require('node:fs').statfsSync(process.argv[1]); } catch (e) { process.exit(['ENOTCONN', 'ECONNABORTED'].includes(e.code) ? 3 : 4); }`;

/** Whether the FUSE connection behind the mount on `mountpoint` is gone (the kernel answers ENOTCONN or ECONNABORTED). */
export function connectionGone(mountpoint: string, timeoutMs = PROBE_MS): Promise<boolean> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['-e', PROBE, mountpoint],
      { timeout: timeoutMs, killSignal: 'SIGKILL', env: { ...process.env, NODE_OPTIONS: '' } },
      (err) => resolve((err as { code?: unknown } | null)?.code === 3),
    );
  });
}

/**
 * Agent mounts outside `held` whose connection is still alive: served by a
 * running agent, or kept by another agent's fd holder between two agents.
 * The stale mount cleaning must leave them alone. A mount whose probe could
 * not decide (no answer in time, another error) counts as alive: a stale
 * mount left behind fails one export visibly; a live one unmounted by
 * mistake fails its clients.
 */
export async function liveAgentMounts(held: ReadonlySet<string>): Promise<MountEntry[]> {
  const candidates = (await readMountTable()).filter(
    (e) => mountOwner(e)?.kind === 'agent' && !held.has(e.mountpoint),
  );
  if (candidates.length === 0) return [];
  const open = openConnections();
  const gone = await Promise.all(
    candidates.map((e) => (open.has(Number(e.device.split(':')[1])) ? false : connectionGone(e.mountpoint))),
  );
  // One unmounted meanwhile (another agent cleaned it) was not probed but the file under it: drop it.
  const still = new Set((await readMountTable()).map((e) => e.mountId));
  return candidates.filter((e, i) => !gone[i] && still.has(e.mountId));
}

/**
 * The FUSE connections some process in sight holds a descriptor of, from
 * /proc/<pid>/fdinfo: proof that they live. Not the whole truth (a holder in
 * another pid namespace, another user's processes to a non-root agent, a
 * kernel that does not name the connection there): a connection missing
 * here is asked (connectionGone), never taken for gone.
 */
export function openConnections(): Set<number> {
  // Synchronous: procfs answers from memory, several times faster than a
  // thread pool round trip per descriptor, and the agent is only starting.
  const connections = new Set<number>();
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue; // exited, or not ours to read
    }
    for (const fd of fds) {
      try {
        if (readlinkSync(`/proc/${pid}/fd/${fd}`) !== '/dev/fuse') continue;
        const m = /^fuse_connection:\s*(\d+)$/m.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
        if (m) connections.add(Number(m[1]));
      } catch {
        // closed meanwhile, or the process exited
      }
    }
  }
  return connections;
}

/**
 * The process a mount's source names is gone (or is this very process, which
 * did not make it: a predecessor with the same pid, as pid 1 in a container).
 */
export function ownerGone(e: MountEntry): boolean {
  const pid = mountOwner(e)?.pid;
  if (pid === undefined) return false;
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
}
