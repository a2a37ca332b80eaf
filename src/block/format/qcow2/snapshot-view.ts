/**
 * A read-only view of an internal snapshot: the image read through the
 * snapshot's L1 table instead of the active one, as `qemu-img convert -l` and
 * `qemu-nbd -l` do. Checked against qemu-img 7.2 on this machine: a snapshot is
 * found by id first, then by name; the view keeps the image's current virtual
 * size (L1 entries past the snapshot's table read as unallocated, so zeroes or
 * the backing file); the backing file is the image's own.
 */
import { BlkError, Errno } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import type { Qcow2Header } from './header.js';
import type { Qcow2Snapshot } from './snapshots.js';

/** The snapshot `want` names (its id, else its name); an error listing the snapshots there are otherwise. */
export function selectSnapshot(
  snapshots: readonly Qcow2Snapshot[],
  want: string,
  path: string,
): Qcow2Snapshot {
  const found = snapshots.find((s) => s.id === want) ?? snapshots.find((s) => s.name === want);
  if (found) return found;
  const there =
    snapshots.length === 0
      ? 'the image has no internal snapshots'
      : `the image has: ${snapshots.map((s) => `id ${s.id} name ${JSON.stringify(s.name)}`).join(', ')}`;
  throw new BlkError('USAGE', `no internal snapshot with id or name ${JSON.stringify(want)}: ${there}`, {
    file: path,
    field: 'snapshot',
  });
}

/**
 * The snapshot's L1 table as the reader wants it: `header.l1Needed` entries
 * for the current virtual size, zero (unallocated) past the snapshot's own
 * table. readSnapshots has checked the table (aligned, capped, inside the file).
 */
export async function readSnapshotL1(
  file: BlockNode,
  header: Qcow2Header,
  sn: Qcow2Snapshot,
): Promise<Buffer> {
  const l1 = Buffer.alloc(header.l1Needed * 8);
  const entries = Math.min(sn.l1Size, header.l1Needed);
  if (entries > 0) await file.read(sn.l1TableOffset, l1.subarray(0, entries * 8));
  return l1;
}

/** The refusal of a write to a snapshot view. */
export function snapshotViewReadOnly(path: string, sn: Qcow2Snapshot): BlkError {
  return new BlkError(
    'READ_ONLY',
    `a view of internal snapshot ${JSON.stringify(sn.name)} (id ${sn.id}) is read-only`,
    { file: path, field: 'snapshot' },
    { errno: Errno.EROFS },
  );
}
