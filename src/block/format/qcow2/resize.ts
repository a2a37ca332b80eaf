/**
 * Resize (growable exports, `create`). Growing past what the L1 table maps
 * moves the L1 table to a larger place: the new table is written and synced
 * before the header names it, and the old one is freed after (the write-back
 * does both, in that order). Shrinking follows QEMU: refused with internal
 * snapshots; the clusters past the new end are unmapped and the tail of the
 * last cluster zeroed, so growing again shows zeroes.
 */
import { BlkError, Errno } from '../../../errors.js';
import { writeBack } from './commit.js';
import { MAX_L1_BYTES } from './header.js';
import type { Qcow2State } from './state.js';
import { checkNotCorrupt, exclusiveQuiet } from './write.js';
import { zeroLocked } from './zero.js';

/** Changes the virtual size to `size` and makes the change durable. */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
export async function resizeImage(s: Qcow2State, size: number): Promise<void> {
  checkNotCorrupt(s);
  const h = s.header;
  const w = s.w!;
  const cs = h.clusterSize;
  await exclusiveQuiet(s);
  try {
    const old = h.size;
    if (size < old) {
      if (s.snapshots.length > 0) {
        throw new BlkError(
          'NOT_SUPPORTED',
          'cannot shrink an image with internal snapshots',
          { file: s.path, field: 'size' },
          { errno: Errno.EINVAL },
        );
      }
      // Zeroes over everything past the new end (whole clusters are unmapped), then the smaller size.
      await zeroLocked(s, size, old - size, true);
      h.size = size;
      h.l1Needed = Math.ceil(size / h.l2Coverage);
    } else if (size > old) {
      const need = Math.ceil(size / h.l2Coverage);
      if (need * 8 > MAX_L1_BYTES) {
        throw new BlkError(
          'IMAGE_TOO_LARGE',
          `virtual size ${size} needs an L1 table above 32 MiB`,
          { file: s.path, field: 'size' },
          { errno: Errno.EFBIG },
        );
      }
      if (need > h.l1Size) {
        const clusters = Math.ceil((need * 8) / cs);
        const run = await s.refcounts.allocate(clusters, false);
        let start = run.start;
        if (run.count < clusters) {
          // Not contiguous here: give the run back (after the switch, like any free) and take space at the end.
          for (let i = 0; i < run.count; i++) s.refcounts.deferred.push(run.start + i);
          s.refcounts.freeHint = Math.ceil(s.refcounts.hostEnd / cs);
          const again = await s.refcounts.allocate(clusters, false);
          start = again.start;
        }
        for (let i = 0; i < clusters; i++) w.meta.add(start + i);
        const l1 = Buffer.alloc(clusters * cs);
        s.l1.copy(l1, 0, 0, h.l1Size * 8);
        const oldFirst = h.l1TableOffset / cs;
        const oldClusters = Math.ceil((h.l1Size * 8) / cs);
        // The old table stays named by the header on disk until the write-back switches it.
        if (h.l1Size > 0) for (let i = 0; i < oldClusters; i++) s.refcounts.deferred.push(oldFirst + i);
        s.l1 = l1;
        h.l1TableOffset = start * cs;
        h.l1Size = need;
      }
      h.size = size;
      h.l1Needed = need;
      // A backing file longer than the old size must not show through the new area.
      const backingLen = s.backing?.length() ?? 0;
      if (backingLen > old) await zeroLocked(s, old, Math.min(size, backingLen) - old, true);
    }
  } finally {
    w.lock.releaseExclusive();
  }
  await writeBack(s);
}
