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

/**
 * Where a reference walk counts: host cluster `c` is referenced once more,
 * as `what` ('L2 table', 'data cluster', ...); `owned` when the reference is
 * an active table's entry with COPIED set (a writer may then change the
 * cluster in place).
 */
export type ReferenceSink = (c: number, owned: boolean, what: string) => void;

interface Walk {
  errors: number;
  messages: string[];
  allocated: number;
  fragmented: number;
  compressed: number;
}

function entryOffset(buf: Buffer, at: number): number {
  return (buf.readUInt32BE(at) & 0x00ffffff) * TWO32 + ((buf.readUInt32BE(at + 4) & 0xfffffe00) >>> 0);
}

/**
 * The host offset of L2 entry `j` (0: none) when it is the common kind,
 * decoded inline (a walk meets millions): standard (no extended L2, not
 * compressed), no reserved bit set, aligned, past the header, inside the
 * file, no zero flag in a v2 image. -1 for anything else: readL2Entry checks it.
 */
function plainEntry(s: Qcow2State, table: Buffer, j: number): number {
  const h = s.header;
  if (h.extendedL2) return -1;
  const hi = table.readUInt32BE(j * 8);
  const lo = table.readUInt32BE(j * 8 + 4);
  if ((hi & 0x7f000000) !== 0 || (lo & 0x1fe) !== 0 || ((lo & 1) !== 0 && h.version === 2)) return -1;
  const host = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
  if (host === 0) return 0;
  const cs = h.clusterSize;
  return host % cs === 0 && host >= cs && host < s.refcounts.hostEnd ? host : -1;
}

async function readAt(s: Qcow2State, off: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  if (len > 0) await s.file.read(off, b);
  return b;
}

/**
 * Counts every reference the metadata makes, per host cluster inside the
 * file, into `sink` (references beyond the end are errors of the walk).
 */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
export async function countReferences(
  s: Qcow2State,
  sink: ReferenceSink,
  progress?: (done: number) => void,
): Promise<Walk> {
  const h = s.header;
  const cs = h.clusterSize;
  const nb = Math.ceil(s.file.length() / cs);
  const walk: Walk = {
    errors: 0,
    messages: [],
    allocated: 0,
    fragmented: 0,
    compressed: 0,
  };
  const inc = (off: number, len: number, what: string, owned = false) => {
    if (len <= 0) return;
    for (let c = Math.floor(off / cs); c * cs < off + len; c++) {
      if (c >= nb) {
        walk.errors++;
        walk.messages.push(`ERROR ${what} at offset ${off} lies beyond the end of the image`);
        return;
      }
      sink(c, owned, what);
    }
  };
  // biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
  const walkL1 = async (l1: Buffer, size: number, active: boolean) => {
    for (let i = 0; i < size; i++) {
      // Like qemu-img, contiguity is judged inside one L2 table.
      let prevHost = -1;
      const l2Off = entryOffset(l1, i * 8);
      const l2Owned = active && (l1.readUInt32BE(i * 8) & 0x80000000) !== 0;
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
      inc(l2Off, cs, 'L2 table', l2Owned);
      const table = await readAt(s, l2Off, cs);
      for (let j = 0; j < h.l2Entries; j++) {
        const gc = i * h.l2Entries + j;
        let host = plainEntry(s, table, j);
        let copied = host > 0 && table.readUInt32BE(j * 8) >= 0x80000000;
        if (host < 0) {
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
          host = e.host;
          copied = e.copied;
        }
        if (host === 0) continue;
        inc(host, cs, 'data cluster', active && copied);
        if (active) {
          walk.allocated++;
          if (prevHost >= 0 && host !== prevHost + cs) walk.fragmented++;
          prevHost = host;
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
  const counted = new Uint32Array(Math.ceil(s.file.length() / cs));
  const walk = await countReferences(
    s,
    (c) => {
      counted[c]!++;
    },
    (f) => progress?.(f * 0.8),
  );
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
  const nb = counted.length;
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
    const want = counted[c]!;
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
