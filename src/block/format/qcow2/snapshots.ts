/**
 * The internal snapshot table: parsed at open for `info` and checked (each
 * snapshot's L1 table aligned, capped and inside the file). Reads use the
 * active L1 table, or a snapshot's for a snapshot view (snapshot-view.ts).
 */
import { BlkError } from '../../../errors.js';
import type { BlockNode } from '../../types.js';
import { MAX_L1_BYTES, type Qcow2Header } from './header.js';

/** Cap on the whole snapshot table, far above what 65 536 ordinary snapshots need. */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
const MAX_EXTRA = 1024;
const CHUNK = 256 * 1024;

export interface Qcow2Snapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  diskSize: number | undefined;
  icount: number | undefined;
}

/** Reads and checks the snapshot table; returns the snapshots and the table's byte length. */
export async function readSnapshots(
  h: Qcow2Header,
  file: BlockNode,
  fileLength: number,
  path: string,
): Promise<{ snapshots: Qcow2Snapshot[]; tableBytes: number }> {
  const invalid = (msg: string) =>
    new BlkError('IMAGE_INVALID', msg, { file: path, field: 'snapshots_offset' });
  const snapshots: Qcow2Snapshot[] = [];
  if (h.nbSnapshots === 0) return { snapshots, tableBytes: 0 };
  const limit = Math.min(fileLength - h.snapshotsOffset, MAX_SNAPSHOT_TABLE_BYTES);
  // A small buffered reader over [snapshotsOffset, snapshotsOffset+limit).
  let buf = Buffer.alloc(0);
  let bufStart = 0;
  const need = async (pos: number, n: number): Promise<number> => {
    if (pos + n > limit) {
      throw invalid(
        limit === MAX_SNAPSHOT_TABLE_BYTES
          ? 'snapshot table exceeds 64 MiB'
          : 'snapshot table runs past the end of the file',
      );
    }
    if (pos >= bufStart && pos + n <= bufStart + buf.length) return pos - bufStart;
    const len = Math.min(limit - pos, Math.max(n, CHUNK));
    buf = Buffer.allocUnsafe(len);
    bufStart = pos;
    await file.read(h.snapshotsOffset + pos, buf);
    return 0;
  };
  let pos = 0;
  for (let i = 0; i < h.nbSnapshots; i++) {
    let at = await need(pos, 40);
    const l1TableOffset = buf.readBigUInt64BE(at);
    const l1Size = buf.readUInt32BE(at + 8);
    const idLen = buf.readUInt16BE(at + 12);
    const nameLen = buf.readUInt16BE(at + 14);
    const dateSec = buf.readUInt32BE(at + 16);
    const dateNsec = buf.readUInt32BE(at + 20);
    const vmClockNsec = Number(buf.readBigUInt64BE(at + 24));
    let vmStateSize = buf.readUInt32BE(at + 32);
    const extraLen = buf.readUInt32BE(at + 36);
    if (extraLen > MAX_EXTRA) throw invalid(`snapshot ${i}: ${extraLen} bytes of extra data exceed 1 KiB`);
    const entryLen = 40 + extraLen + idLen + nameLen;
    at = await need(pos, entryLen);
    let diskSize: number | undefined;
    let icount: number | undefined;
    if (extraLen >= 8) vmStateSize = Number(buf.readBigUInt64BE(at + 40));
    if (extraLen >= 16) diskSize = Number(buf.readBigUInt64BE(at + 48));
    if (extraLen >= 24) {
      const ic = buf.readBigInt64BE(at + 56);
      icount = ic < 0n ? undefined : Number(ic);
    }
    const idStart = at + 40 + extraLen;
    const id = buf.toString('utf8', idStart, idStart + idLen);
    const name = buf.toString('utf8', idStart + idLen, idStart + idLen + nameLen);
    if (l1TableOffset > BigInt(Number.MAX_SAFE_INTEGER))
      throw invalid(`snapshot ${i}: L1 table offset too large`);
    const l1Off = Number(l1TableOffset);
    if (l1Size * 8 > MAX_L1_BYTES)
      throw invalid(`snapshot ${i}: L1 table of ${l1Size} entries exceeds 32 MiB`);
    if (l1Off % h.clusterSize !== 0) throw invalid(`snapshot ${i}: L1 table offset ${l1Off} is not aligned`);
    if (l1Size > 0 && (l1Off === 0 || l1Off + l1Size * 8 > fileLength)) {
      throw invalid(`snapshot ${i}: L1 table lies outside the file`);
    }
    snapshots.push({
      id,
      name,
      l1TableOffset: l1Off,
      l1Size,
      dateSec,
      dateNsec,
      vmClockNsec,
      vmStateSize,
      diskSize,
      icount,
    });
    pos += Math.ceil(entryLen / 8) * 8;
  }
  return { snapshots, tableBytes: pos };
}
