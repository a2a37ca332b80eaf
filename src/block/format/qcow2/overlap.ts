/**
 * Overlap protection: the set of host clusters that hold metadata (header,
 * L1 tables, L2 tables, refcount table and blocks, snapshot table, bitmap
 * directory). Every data write is checked against it before it is issued,
 * like QEMU's overlap check, so a corrupt L2 entry can never make a guest
 * write land on metadata; a hit marks the image corrupt.
 */
import { BlkError, Errno } from '../../../errors.js';
import { markCorrupt } from './header-write.js';
import type { Qcow2State } from './state.js';

/** Throws IMAGE_CORRUPT (and marks the image corrupt) when [host, host+len) touches a metadata cluster. */
export function checkNoOverlap(s: Qcow2State, host: number, len: number): void {
  const meta = s.w!.meta;
  const cs = s.header.clusterSize;
  const last = Math.floor((host + len - 1) / cs);
  for (let c = Math.floor(host / cs); c <= last; c++) {
    if (meta.has(c)) {
      s.corrupt = true;
      void markCorrupt(s).catch(() => undefined);
      throw new BlkError(
        'IMAGE_CORRUPT',
        `a data write at host offset ${host} (+${len}) would overwrite metadata in cluster ${c}: image marked corrupt`,
        { file: s.path, field: 'l2_entry' },
        { errno: Errno.EIO },
      );
    }
  }
}
