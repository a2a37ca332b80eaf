/**
 * Manifest options → QMP arguments (blockdev-add, block-export-add), and the
 * checks we make on an image before QEMU sees it: its format probed by us,
 * and nothing in it that would make QEMU open another host file on its own.
 */
import { closeSync, openSync } from 'node:fs';
import { identifyFormat, PROBE_BYTES } from '../../block/probe.js';
import { preadFull } from '../../block/protocol/file-io.js';
import { BlkError } from '../../errors.js';
import type { ExportOptions, NodeOptions } from '../../reconcile/model.js';
import { nbdExportArgs } from './nbd.js';

/** Format drivers the qemu engine passes to QEMU. */
export const QEMU_FORMATS: readonly string[] = ['raw', 'qcow2', 'vmdk', 'vhdx', 'vpc', 'vdi', 'qed'];

/** Drivers whose images can name a backing file; we pass `backing` explicitly (a node, or null). */
export const BACKING_FORMATS: readonly string[] = ['qcow2', 'vmdk', 'qed'];

/** Reads the first bytes of a host file with our own descriptor. */
export async function readHead(path: string): Promise<Buffer> {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (e) {
    throw new BlkError('IO', `cannot open: ${(e as Error).message}`, { file: path }, { cause: e });
  }
  try {
    const head = Buffer.alloc(PROBE_BYTES);
    await preadFull(fd, head, 0, PROBE_BYTES, 0); // zero-filled past the end
    return head;
  } finally {
    closeSync(fd);
  }
}

/**
 * Refuses images that would make QEMU open host files they name: a qcow2
 * with an external data file, a vmdk descriptor (its extents are host paths).
 * Backing files are handled by passing `backing` explicitly.
 */
export function checkImageHead(driver: string, head: Buffer, file: string): void {
  if (driver === 'qcow2' && head.length >= 80 && head.readUInt32BE(4) >= 3) {
    const incompatible = head.readBigUInt64BE(72);
    if (incompatible & 4n) {
      throw new BlkError(
        'BACKING_POLICY',
        'the qcow2 image names an external data file; the qemu engine does not let QEMU open files an image names',
        { file, field: 'incompatible_features' },
      );
    }
  }
  if (
    driver === 'vmdk' &&
    head.toString('latin1', 0, 4) !== 'KDMV' &&
    head.toString('latin1', 0, 4) !== 'COWD'
  ) {
    throw new BlkError(
      'BACKING_POLICY',
      'a vmdk descriptor file names its extents as host paths; only single-file (monolithicSparse, streamOptimized) vmdk images are opened',
      { file },
    );
  }
}

/** The format to pass QEMU for a node whose manifest said `auto`: probed by us from the image's magic. */
export function probedQemuFormat(head: Buffer, file: string): string {
  const f = identifyFormat(head, file);
  if (!QEMU_FORMATS.includes(f)) {
    throw new BlkError('IMAGE_UNSUPPORTED', `format ${f} is not supported by the qemu engine`, { file });
  }
  return f;
}

/** blockdev-add arguments for a manifest node; `driver` is the resolved one (never auto). */
export function blockdevArgs(n: NodeOptions, driver: string): Record<string, unknown> {
  // read-only exactly as asked, never auto-read-only: QEMU would reopen the file by its name when a
  // writer appears, and when an export is mounted over the image that name is QSD's own mount (a deadlock).
  const a: Record<string, unknown> = { driver, 'node-name': n['node-name'], 'read-only': n['read-only'] };
  if (n.cache) a.cache = { direct: n.cache.direct, 'no-flush': n.cache['no-flush'] };
  if (driver === 'file') {
    a.filename = n.filename;
    if (n.locking !== undefined) a.locking = n.locking;
    if (n['force-share']) a['force-share'] = true;
    return a;
  }
  if (n.snapshot !== undefined) {
    // qemu-nbd -l and qemu-img convert -l load a snapshot through an internal call; QMP has no way.
    throw new BlkError(
      'NOT_SUPPORTED',
      `node '${n['node-name']}': snapshot views need the native engine (QEMU 7.2's blockdev-add has no option to open an internal snapshot)`,
    );
  }
  if (n.file !== undefined) a.file = n.file;
  if (driver === 'raw') {
    if (n.offset !== undefined && n.offset !== 0) a.offset = n.offset;
    if (n.size !== undefined) a.size = n.size;
  }
  // Never let QEMU follow a backing file name from the image on its own.
  if (BACKING_FORMATS.includes(driver)) a.backing = n.backing ?? null;
  return a;
}

/** block-export-add arguments for a manifest export. */
export function exportArgs(e: ExportOptions): Record<string, unknown> {
  if (e.overlay !== undefined) {
    // QSD could: blockdev-create a qcow2 on a temporary file, blockdev-add it with backing = the image
    // node (force-share on the image), export that. The qemu engine does not build that graph yet.
    throw new BlkError(
      'NOT_SUPPORTED',
      `export '${e.id}': overlay: ephemeral needs the native engine (spec.engine: native); the qemu engine does not build the overlay graph yet`,
    );
  }
  if (e.type === 'nbd') return nbdExportArgs(e);
  return {
    type: 'fuse',
    id: e.id,
    'node-name': e['node-name'],
    mountpoint: e.mountpoint,
    writable: e.writable,
    growable: e.growable,
    'allow-other': e['allow-other'],
  };
}
