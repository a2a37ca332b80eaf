/**
 * `blkexport umount MOUNTPOINT`: asks the process serving a `blkexport mount`
 * export to flush and unmount, and waits for it to exit. A mount whose
 * process is gone (stale: ENOTCONN) is cleaned with a lazy unmount.
 */
import { readFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { BlkError } from '../../errors.js';
import { lazyUnmount } from '../../export/fuse/file-fs.js';
import { mountedPath, mountOwner, readMountTable, topMountAt } from '../../export/mount-table.js';
import { parseCommandArgs } from '../args.js';

export const summary = 'flush and unmount what `blkexport mount` mounted';
export const usage = `usage: blkexport umount MOUNTPOINT [--timeout SEC]

Asks the process serving the export on MOUNTPOINT to flush and unmount, and
returns when it has exited. If that process is gone and the mount is stale,
cleans the mount. Exports of the agent are removed from their manifest instead.

options:
  --timeout SEC   how long to wait for the serving process (default 60)
`;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function isBlkexportProcess(pid: number): Promise<boolean> {
  try {
    return (await readFile(`/proc/${pid}/cmdline`, 'utf8')).includes('blkexport');
  } catch {
    return false;
  }
}

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('umount', args, {
    timeout: { type: 'string', default: '60' },
  });
  if (positionals.length !== 1)
    throw new BlkError('USAGE', 'expected MOUNTPOINT (see blkexport umount --help)');
  const mountpoint = await mountedPath(positionals[0]!);
  const timeoutMs = Number(values.timeout) * 1000;
  if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) throw new BlkError('USAGE', '--timeout takes seconds');

  const entry = topMountAt(await readMountTable(), mountpoint);
  const owner = entry && mountOwner(entry);
  if (!entry || !owner) throw new BlkError('USAGE', `no blkexport export is mounted on '${mountpoint}'`);
  if (owner.kind === 'agent') {
    throw new BlkError(
      'USAGE',
      `'${mountpoint}' is served by the blkexport agent (pid ${owner.pid}); remove its export from the manifest instead`,
    );
  }

  if (alive(owner.pid) && (await isBlkexportProcess(owner.pid))) {
    process.kill(owner.pid, 'SIGTERM');
    const deadline = Date.now() + timeoutMs;
    while (alive(owner.pid) && Date.now() < deadline) await sleep(50);
    if (alive(owner.pid)) {
      throw new BlkError(
        'AGENT',
        `the process serving '${mountpoint}' (pid ${owner.pid}) did not exit within ${values.timeout} s`,
      );
    }
  }
  // Gone: if the mount is still listed (the process died without unmounting), it is stale; clean it.
  const still = topMountAt(await readMountTable(), mountpoint);
  if (still && still.mountId === entry.mountId) {
    await lazyUnmount(mountpoint);
    console.log(`cleaned stale mount on ${mountpoint} (pid ${owner.pid} was gone)`);
  } else {
    console.log(`unmounted ${mountpoint}`);
  }
  return 0;
}
