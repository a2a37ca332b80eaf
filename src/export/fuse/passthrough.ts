/**
 * FUSE passthrough for raw exports (docs/fuse-export.md, "Passthrough"):
 * which exports qualify, and the one log line that says whether a mount got
 * it. The kernel then does reads and writes on the image file itself; the
 * binding side is native-fuse/passthrough.c.
 *
 * Qualifies: a `raw` node straight over a `file` node whose guest offsets
 * are the file's own (no window, or a window of the whole file), exported
 * read-only or growable. A writable export that is not growable does not:
 * the kernel would let a write past the end grow the image file, which
 * only `growable` allows. BLKEXPORT_FUSE_PASSTHROUGH=off turns it off.
 */

import type { BlockNode } from '../../block/types.js';
import { Errno } from '../../errors.js';
import type { PassthroughInfo } from './file-fs.js';

/** The environment variable that turns passthrough off (`off`); anything else leaves it on. */
export const PASSTHROUGH_ENV = 'BLKEXPORT_FUSE_PASSTHROUGH';

/**
 * Whether an export gets passthrough, and why not when it does not: `node`,
 * the node never qualifies (qcow2, a window); `options`, the export's options
 * or the environment; `kernel`, the kernel or the binding refused.
 */
export type PassthroughStatus =
  | { active: true; backingId: number }
  | { active: false; reason: string; why: 'node' | 'options' | 'kernel' };

/**
 * The image file's descriptor when `node` is a raw node whose bytes are
 * those of one host file at the same offsets, else why not. Pure: asks the
 * node's cached map only.
 */
export function identityFile(node: BlockNode): { fd: number } | { reason: string } {
  const child = node.children[0];
  if (node.driver !== 'raw' || !child || child.driver !== 'file') {
    return { reason: `the node is '${node.driver}', not raw over a file` };
  }
  const size = node.length();
  if (size !== child.length()) {
    return { reason: 'the raw node is a window of its file (offset/size), which the kernel cannot shift' };
  }
  if (size === 0) return { reason: 'the image is empty' };
  const map = node.mapHostCached?.(0, size);
  const only = map?.length === 1 ? map[0] : undefined;
  if (!only || !('fd' in only) || only.host !== 0 || only.length !== size) {
    return { reason: 'the raw node does not map to its file at the same offsets' };
  }
  return { fd: only.fd };
}

/** Why an export with these options does not get passthrough, or undefined when it may. */
export function passthroughRefused(opts: { writable: boolean; growable: boolean }): string | undefined {
  if (process.env[PASSTHROUGH_ENV] === 'off') return `${PASSTHROUGH_ENV}=off`;
  if (opts.writable && !opts.growable) {
    return 'the export is writable but not growable (the kernel would let a write past the end grow the image)';
  }
  return undefined;
}

/** What the kernel's answer means, in words for the log. */
export function describePassthrough(info: PassthroughInfo): PassthroughStatus {
  if (info.backingId > 0) return { active: true, backingId: info.backingId };
  const refused = (reason: string): PassthroughStatus => ({ active: false, why: 'kernel', reason });
  if (!info.offered) {
    return refused(
      'the kernel does not offer FUSE passthrough (Linux 6.9 or later with CONFIG_FUSE_PASSTHROUGH has it)',
    );
  }
  switch (info.errno) {
    case Errno.EPERM:
      return refused('registering the image file needs CAP_SYS_ADMIN (run as root)');
    case Errno.ELOOP:
      return refused(
        'the image lies on a stacked filesystem (e.g. overlayfs), deeper than FUSE passthrough allows',
      );
    default:
      return refused(`the kernel refused the image file for passthrough (errno ${info.errno})`);
  }
}

/** The log line for a mount's passthrough status. */
export function passthroughLogLine(status: PassthroughStatus): string {
  return status.active
    ? 'FUSE passthrough: the kernel serves reads and writes of this export from the image file'
    : `FUSE passthrough not used: ${status.reason}; reads and writes go through blkexport`;
}
