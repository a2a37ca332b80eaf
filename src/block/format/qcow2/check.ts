/**
 * Consistency check and repair, like `qemu-img check`: count every reference
 * the image's metadata makes (header, L1 tables, L2 tables, data and
 * compressed clusters of the active state and every snapshot, refcount table
 * and blocks, snapshot table, bitmap directory, tables and data), compare
 * with the stored refcounts (refcount below references = corruption, above =
 * leak), and check COPIED on the active tables. Repair sets the refcounts to
 * the references (leaks, or everything) and fixes COPIED, through the
 * ordered write-back. The same repair rebuilds a dirty lazy-refcount image.
 */

import { writeBack } from './commit.js';
import { readL1Entry, readL2Entry, writeL1Entry, writeL2Entry } from './entries.js';
import { INCOMPAT_CORRUPT } from './header.js';
import { writeIncompatible } from './header-write.js';
import type { Qcow2State } from './state.js';
import { markL2Dirty } from './write.js';

const TWO32 = 2 ** 32;

export type RepairMode = 'none' | 'leaks' | 'all';

/** What a check found (and fixed), with qemu-img's counters. */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  allocatedClusters: number;
  totalClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  imageEndOffset: number;
  /** One line per problem, in qemu-img's words. */
  messages: string[];
}

interface Walk {
  refs: Uint32Array;
  /** Clusters beyond the end of the file that something references. */
  beyond: number;
  errors: number;
  messages: string[];
  allocated: number;
  fragmented: number;
  compressed: number;
}

function entryOffset(buf: Buffer, at: number): number {
  return (buf.readUInt32BE(at) & 0x00ffffff) * TWO32 + ((buf.readUInt32BE(at + 4) & 0xfffffe00) >>> 0);
}

async function readAt(s: Qcow2State, off: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  if (len > 0) await s.file.read(off, b);
  return b;
}

/** Counts every reference the metadata makes, per host cluster. */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
async function countReferences(s: Qcow2State, progress?: (done: number) => void): Promise<Walk> {
  const h = s.header;
  const cs = h.clusterSize;
  const nb = Math.ceil(s.file.length() / cs);
  const walk: Walk = {
    refs: new Uint32Array(nb),
    beyond: 0,
    errors: 0,
    messages: [],
    allocated: 0,
    fragmented: 0,
    compressed: 0,
  };
  const inc = (off: number, len: number, what: string) => {
    if (len <= 0) return;
    for (let c = Math.floor(off / cs); c * cs < off + len; c++) {
      if (c >= nb) {
        walk.errors++;
        walk.messages.push(`ERROR ${what} at offset ${off} lies beyond the end of the image`);
        return;
      }
      walk.refs[c]!++;
    }
  };
  // biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
  const walkL1 = async (l1: Buffer, size: number, active: boolean) => {
    for (let i = 0; i < size; i++) {
      // Like qemu-img, contiguity is judged inside one L2 table.
      let prevHost = -1;
      const l2Off = entryOffset(l1, i * 8);
      if (l2Off === 0) continue;
      if (l2Off % cs !== 0) {
        walk.errors++;
        walk.messages.push(
          `ERROR l2_offset=${l2Off.toString(16)}: Table is not cluster aligned; L1 entry corrupted`,
        );
        continue;
      }
      if (l2Off + cs > s.file.length()) {
        inc(l2Off, cs, 'L2 table');
        continue;
      }
      inc(l2Off, cs, 'L2 table');
      const table = await readAt(s, l2Off, cs);
      for (let j = 0; j < h.l2Entries; j++) {
        const gc = i * h.l2Entries + j;
        let e: ReturnType<typeof readL2Entry>;
        try {
          e = readL2Entry(s, table, j, gc);
        } catch (err) {
          s.corrupt = false; // a check reports, it does not poison the node
          walk.errors++;
          walk.messages.push(`ERROR ${(err as Error).message}`);
          continue;
        }
        if (e.compressed) {
          for (let c = e.cfirst; c <= e.clast; c++) inc(c * cs, 1, 'compressed cluster');
          if (active) {
            // Compressed clusters count as fragmented (qemu-img: they are read by whole sectors).
            walk.allocated++;
            walk.compressed++;
            walk.fragmented++;
          }
          continue;
        }
        if (e.host === 0) continue;
        inc(e.host, cs, 'data cluster');
        if (active) {
          walk.allocated++;
          if (prevHost >= 0 && e.host !== prevHost + cs) walk.fragmented++;
          prevHost = e.host;
        }
      }
      progress?.(i / Math.max(1, size));
    }
  };

  inc(0, cs, 'header');
  inc(h.l1TableOffset, h.l1Size * 8, 'L1 table');
  await walkL1(s.l1, h.l1Size, true);
  if (s.snapshots.length > 0) {
    const area = s.metadata.find((m) => m[0] === 'snapshot table');
    if (area) inc(area[1], area[2] - area[1], 'snapshot table');
    for (const sn of s.snapshots) {
      inc(sn.l1TableOffset, sn.l1Size * 8, 'snapshot L1 table');
      await walkL1(await readAt(s, sn.l1TableOffset, sn.l1Size * 8), sn.l1Size, false);
    }
  }
  const refs = s.refcounts;
  inc(refs.tableOffset, refs.tableClusters * cs, 'refcount table');
  for (let ti = 0; ti < refs.entries; ti++) {
    let off: number;
    try {
      off = refs.blockOffset(ti);
    } catch (err) {
      walk.errors++;
      walk.messages.push(`ERROR ${(err as Error).message}`);
      continue;
    }
    if (off !== 0) inc(off, cs, 'refcount block');
  }
  const bm = s.ext.bitmaps;
  if (bm) {
    inc(bm.directoryOffset, bm.directorySize, 'bitmap directory');
    const dir = await readAt(s, bm.directoryOffset, bm.directorySize);
    let at = 0;
    for (let i = 0; i < bm.count && at + 24 <= dir.length; i++) {
      const tableOff = Number(dir.readBigUInt64BE(at));
      const tableSize = dir.readUInt32BE(at + 8);
      const nameSize = dir.readUInt16BE(at + 18);
      const extra = dir.readUInt32BE(at + 20);
      inc(tableOff, tableSize * 8, 'bitmap table');
      if (tableOff + tableSize * 8 <= s.file.length()) {
        const table = await readAt(s, tableOff, tableSize * 8);
        for (let j = 0; j < tableSize; j++) {
          const off = entryOffset(table, j * 8);
          if (off !== 0) inc(off, cs, 'bitmap data');
        }
      }
      at = Math.ceil((at + 24 + extra + nameSize) / 8) * 8;
    }
  }
  return walk;
}

/** Checks the image behind `s` and repairs what `mode` allows (the node must be writable to repair). */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
export async function checkImage(
  s: Qcow2State,
  mode: RepairMode,
  progress?: (fraction: number) => void,
): Promise<CheckResult> {
  const h = s.header;
  const cs = h.clusterSize;
  if (s.l1.length < h.l1Size * 8) s.l1 = await readAt(s, h.l1TableOffset, h.l1Size * 8);
  const walk = await countReferences(s, (f) => progress?.(f * 0.8));
  const refs = s.refcounts;
  const r: CheckResult = {
    corruptions: walk.errors,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    allocatedClusters: walk.allocated,
    totalClusters: Math.ceil(h.size / cs),
    fragmentedClusters: walk.fragmented,
    compressedClusters: walk.compressed,
    imageEndOffset: 0,
    messages: walk.messages,
  };
  const nb = walk.refs.length;
  const fixes: [number, number, number][] = [];
  let last = 0;
  for (let c = 0; c < nb; c++) {
    let stored: number;
    try {
      stored = await refs.getCluster(c);
    } catch (err) {
      r.corruptions++;
      r.messages.push(`ERROR ${(err as Error).message}`);
      continue;
    }
    const want = walk.refs[c]!;
    if (stored > 0 || want > 0) last = c;
    if (stored === want) continue;
    const leak = stored > want;
    const fix = mode === 'all' || (mode === 'leaks' && leak);
    r.messages.push(
      `${fix ? 'Repairing' : leak ? 'Leaked' : 'ERROR'} cluster ${c} refcount=${stored} reference=${want}`,
    );
    if (fix) fixes.push([c, stored, want]);
    else if (leak) r.leaks++;
    else r.corruptions++;
  }
  r.imageEndOffset = (last + 1) * cs;

  if (fixes.length > 0) {
    // New refcount blocks must not land on a referenced cluster whose refcount is still wrong.
    refs.freeHint = Math.max(refs.freeHint, nb);
    for (const [c, stored, want] of fixes) {
      await refs.adjust(c, want - stored);
      if (stored > want) r.leaksFixed++;
      else r.corruptionsFixed++;
    }
  }

  // COPIED on the active tables must say "refcount is exactly 1".
  for (let i = 0; i < h.l1Size; i++) {
    const { off, copied } = readL1Entry(s, i);
    if (off === 0 || off % cs !== 0 || off + cs > s.file.length()) continue;
    const rc = await refs.get(off);
    if ((rc === 1) !== copied) {
      const raw = s.l1
        .readBigUInt64BE(i * 8)
        .toString(16)
        .padStart(16, '0');
      if (mode === 'all') {
        writeL1Entry(s, i, off, rc === 1);
        r.corruptionsFixed++;
        r.messages.push(`Repairing OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${raw} refcount=${rc}`);
      } else {
        r.corruptions++;
        r.messages.push(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${raw} refcount=${rc}`);
      }
    }
    const table = s.l2Cache.peek(off) ?? (await s.l2Cache.get(off));
    let dirty = false;
    for (let j = 0; j < h.l2Entries; j++) {
      let e: ReturnType<typeof readL2Entry>;
      try {
        e = readL2Entry(s, table, j, i * h.l2Entries + j);
      } catch {
        s.corrupt = false;
        continue; // counted by the walk
      }
      if (e.compressed || e.host === 0) continue;
      const drc = await refs.get(e.host);
      if ((drc === 1) === e.copied) continue;
      const raw = table
        .readBigUInt64BE(j * h.l2EntryBytes)
        .toString(16)
        .padStart(16, '0');
      if (mode === 'all') {
        const at = j * h.l2EntryBytes;
        const alloc = h.extendedL2 ? table.readUInt32BE(at + 12) : 0;
        const zero = h.extendedL2 ? table.readUInt32BE(at + 8) : 0;
        writeL2Entry(s, table, j, e.host, drc === 1, e.zero, alloc, zero);
        dirty = true;
        r.corruptionsFixed++;
        r.messages.push(`Repairing OFLAG_COPIED data cluster: l2_entry=${raw} refcount=${drc}`);
      } else {
        r.corruptions++;
        r.messages.push(`ERROR OFLAG_COPIED data cluster: l2_entry=${raw} refcount=${drc}`);
      }
    }
    if (dirty) markL2Dirty(s, off);
    progress?.(0.8 + (0.2 * i) / Math.max(1, h.l1Size));
  }
  if (mode !== 'none' && s.w) {
    await writeBack(s);
    if (mode === 'all' && r.corruptions === 0 && (h.incompatible & INCOMPAT_CORRUPT) !== 0n) {
      await writeIncompatible(s, h.incompatible & ~INCOMPAT_CORRUPT);
    }
  }
  progress?.(1);
  return r;
}
