/**
 * Stale mounts: a previous agent that died (SIGKILL, crash) leaves its FUSE
 * mounts behind, answering ENOTCONN, and mounting again on top fails. At start
 * the agent lazily unmounts every agent mount whose serving process is gone.
 */
import { readFile } from 'node:fs/promises';
import { lazyUnmount } from '../export/fuse/file-fs.js';
import { type MountEntry, mountOwner, readMountTable } from '../export/mount-table.js';

async function isLiveAgent(pid: number): Promise<boolean> {
  try {
    process.kill(pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    return (await readFile(`/proc/${pid}/cmdline`, 'utf8')).includes('blkexport');
  } catch {
    return false;
  }
}

/**
 * Unmounts agent mounts whose process is gone; returns what it cleaned. Run
 * before this agent mounts anything: a mount carrying our own pid is then a
 * predecessor's (in a container the agent is often pid 1 every time).
 * Mountpoints in `held` are alive (the fd holder keeps their connection for
 * this agent to adopt) and stay.
 */
export async function cleanStaleAgentMounts(held: ReadonlySet<string> = new Set()): Promise<MountEntry[]> {
  const cleaned: MountEntry[] = [];
  // Stacked mounts on one path: unmount the topmost first.
  const entries = [...(await readMountTable())].reverse();
  for (const e of entries) {
    const owner = mountOwner(e);
    if (owner?.kind !== 'agent' || held.has(e.mountpoint)) continue;
    if (owner.pid !== process.pid && (await isLiveAgent(owner.pid))) continue;
    try {
      await lazyUnmount(e.mountpoint);
      cleaned.push(e);
    } catch {
      // Another agent starting beside this one may have cleaned it first: one refusal stops nothing.
    }
  }
  return cleaned;
}
