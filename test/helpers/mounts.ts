/**
 * Clean-up for tests that mount: every blkexport FUSE mount under a test's
 * directory is unmounted and its serving process killed, also when the test failed.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mountOwner, parseMountInfo } from '../../src/export/mount-table.js';

/** Our FUSE mounts whose mountpoint lies under `dir`. */
export function mountsUnder(dir: string) {
  return parseMountInfo(readFileSync('/proc/self/mountinfo', 'utf8')).filter(
    (e) => e.fstype.startsWith('fuse') && (e.mountpoint === dir || e.mountpoint.startsWith(`${dir}/`)),
  );
}

/** Kills the serving processes of mounts under `dir` and lazily unmounts what is left (loop devices too). */
export function cleanupMountsUnder(dir: string): void {
  for (const e of mountsUnder(dir).reverse()) {
    const owner = mountOwner(e);
    if (owner && owner.pid !== process.pid) {
      try {
        process.kill(owner.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    spawnSync('umount', ['-l', e.mountpoint], { stdio: 'ignore' });
  }
  // Loop mounts of exported files, in case a test mounted a filesystem from one.
  const loops = parseMountInfo(readFileSync('/proc/self/mountinfo', 'utf8')).filter((e) =>
    e.mountpoint.startsWith(`${dir}/`),
  );
  for (const e of loops.reverse()) spawnSync('umount', ['-l', e.mountpoint], { stdio: 'ignore' });
}

/** Reads a whole exported file from a child process (never from this one's event loop). */
export function readExport(path: string): Buffer {
  const r = spawnSync('cat', [path], { timeout: 20_000, maxBuffer: 256 << 20 });
  if (r.status !== 0) throw new Error(`cat ${path}: ${r.stderr?.toString()}`);
  return r.stdout;
}
