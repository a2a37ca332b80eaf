/**
 * A hand-made hostile qcow2 (issue: shared COPIED clusters): qemu-img makes
 * an image with data in guest clusters 0 (0xaa) and 1 (0xbb), then the L2
 * entry of guest cluster 1 is set equal to guest cluster 0's, COPIED set.
 * Both now read 0xaa from one host cluster whose refcount is 1 (the old
 * host cluster of guest cluster 1 is leaked): QEMU would write through
 * either into the other.
 */
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { qemuImg, qemuIo } from '../helpers/tools.js';

export const SHARED_CLUSTER = 64 * 1024;

export interface SharedImage {
  path: string;
  /** The host offset both guest clusters map. */
  host: number;
}

export function makeSharedImage(dir: string, name = 'shared.qcow2'): SharedImage {
  const path = join(dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', path, '1M');
  qemuIo('-f', 'qcow2', '-c', 'write -P 0xaa 0 64k', '-c', 'write -P 0xbb 64k 64k', path);
  const fd = openSync(path, 'r+');
  try {
    const b = Buffer.alloc(8);
    readSync(fd, b, 0, 8, 40); // l1_table_offset
    const l1 = Number(b.readBigUInt64BE(0));
    readSync(fd, b, 0, 8, l1);
    const l2 = Number(b.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    const e0 = Buffer.alloc(8);
    readSync(fd, e0, 0, 8, l2);
    if ((e0.readBigUInt64BE(0) & (1n << 63n)) === 0n) throw new Error('guest cluster 0 is not COPIED');
    writeSync(fd, e0, 0, 8, l2 + 8);
    return { path, host: Number(e0.readBigUInt64BE(0) & 0x00fffffffffffe00n) };
  } finally {
    closeSync(fd);
  }
}
