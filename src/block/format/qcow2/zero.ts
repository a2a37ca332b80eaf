/**
 * Write-zeroes and discard. Whole clusters become zero clusters (v3: the
 * zero flag, or the zero bitmap with extended L2) or unallocated ones; the
 * clusters they used are freed after the new entries are on disk. Partial
 * clusters are written with zeroes through the write path. Version 2 has no
 * zero flag: without a backing file an unallocated cluster reads as zeroes;
 * with one, zeroes are written as data (what QEMU does too).
 */

import { needCommit } from './commit.js';
import { ALL_SUBCLUSTERS, readL1Entry, readL2Entry, writeL2Entry } from './entries.js';
import { refuseShared } from './shared.js';
import type { Qcow2State } from './state.js';
import {
  checkNotCorrupt,
  exclusiveQuiet,
  freeEntryClusters,
  l2ForWrite,
  markL2Dirty,
  writeAllocating,
} from './write.js';

const ZERO_CHUNK = 1024 * 1024;

async function writeZeroData(s: Qcow2State, offset: number, length: number): Promise<void> {
  for (let done = 0; done < length; ) {
    const n = Math.min(ZERO_CHUNK, length - done);
    await writeAllocating(s, offset + done, Buffer.alloc(n));
    done += n;
  }
}

/** Changes the entries of the whole clusters in [first, last] (guest cluster numbers); lock held. */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
async function rewriteClusters(
  s: Qcow2State,
  first: number,
  last: number,
  mode: 'zero' | 'zero-unmap' | 'discard',
): Promise<void> {
  const h = s.header;
  const cs = h.clusterSize;
  const v3 = h.version === 3;
  const backing = s.backing !== null;
  for (let gc = first; gc <= last; ) {
    const l1i = Math.floor(gc / h.l2Entries);
    const tableLast = Math.min(last, (l1i + 1) * h.l2Entries - 1);
    // An unallocated table reads as zeroes when nothing lies below it.
    if (readL1Entry(s, l1i).off === 0 && (!backing || mode === 'discard')) {
      gc = tableLast + 1;
      continue;
    }
    if (!v3 && backing && mode !== 'discard') {
      await writeZeroData(s, gc * cs, (tableLast - gc + 1) * cs);
      gc = tableLast + 1;
      continue;
    }
    const table = await l2ForWrite(s, l1i);
    const off = readL1Entry(s, l1i).off;
    for (; gc <= tableLast; gc++) {
      const idx = gc - l1i * h.l2Entries;
      const e = readL2Entry(s, table, idx, gc);
      const owned = !e.compressed && e.host !== 0 && e.copied;
      // The new entry: keep an owned cluster preallocated when unmapping is not allowed.
      const keep = mode === 'zero' && owned && v3;
      const zero = v3 && (mode !== 'discard' || backing);
      if (h.extendedL2) {
        if (keep) {
          if (e.allocMask === 0 && e.zeroMask === ALL_SUBCLUSTERS) continue;
          writeL2Entry(s, table, idx, e.host, true, false, 0, ALL_SUBCLUSTERS);
        } else {
          if (
            e.host === 0 &&
            !e.compressed &&
            e.allocMask === 0 &&
            e.zeroMask === (zero ? ALL_SUBCLUSTERS : 0)
          )
            continue;
          writeL2Entry(s, table, idx, 0, false, false, 0, zero ? ALL_SUBCLUSTERS : 0);
          freeEntryClusters(s, e);
        }
      } else if (keep) {
        if (e.zero) continue;
        writeL2Entry(s, table, idx, e.host, true, true);
      } else {
        if (!e.compressed && e.host === 0 && e.zero === zero) continue;
        writeL2Entry(s, table, idx, 0, false, zero);
        freeEntryClusters(s, e);
      }
      markL2Dirty(s, off, idx);
    }
  }
}

/**
 * Makes [offset, offset+length) read as zeroes; whole clusters become zero
 * clusters (unmapped when allowed). Resolves once the new entries are in the file.
 */
export async function writeZeroesGuest(
  s: Qcow2State,
  offset: number,
  length: number,
  mayUnmap: boolean,
): Promise<void> {
  checkNotCorrupt(s);
  const w = s.w!;
  await exclusiveQuiet(s);
  try {
    await zeroLocked(s, offset, length, mayUnmap);
  } finally {
    w.lock.releaseExclusive();
  }
  const pending = needCommit(s, offset, length);
  if (pending !== undefined) await pending;
}

/** writeZeroesGuest with the exclusive lock already held. */
export async function zeroLocked(
  s: Qcow2State,
  offset: number,
  length: number,
  mayUnmap: boolean,
): Promise<void> {
  await refuseShared(s, 'write-zeroes', offset, length);
  const cs = s.header.clusterSize;
  const end = offset + length;
  const firstFull = Math.ceil(offset / cs);
  const lastFull = Math.floor(end / cs) - 1;
  if (firstFull > lastFull) {
    await writeZeroData(s, offset, length);
    return;
  }
  if (offset < firstFull * cs) await writeZeroData(s, offset, firstFull * cs - offset);
  await rewriteClusters(s, firstFull, lastFull, mayUnmap ? 'zero-unmap' : 'zero');
  if (end > (lastFull + 1) * cs) await writeZeroData(s, (lastFull + 1) * cs, end - (lastFull + 1) * cs);
}

/**
 * Drops the whole clusters inside [offset, offset+length) (a hint: partial
 * clusters are left alone). Resolves once the new entries are in the file.
 */
export async function discardGuest(s: Qcow2State, offset: number, length: number): Promise<void> {
  checkNotCorrupt(s);
  const cs = s.header.clusterSize;
  const first = Math.ceil(offset / cs);
  const last = Math.floor((offset + length) / cs) - 1;
  if (first > last) return;
  const w = s.w!;
  await exclusiveQuiet(s);
  try {
    await refuseShared(s, 'discard', first * cs, (last - first + 1) * cs);
    await rewriteClusters(s, first, last, 'discard');
  } finally {
    w.lock.releaseExclusive();
  }
  const pending = needCommit(s, first * cs, (last - first + 1) * cs);
  if (pending !== undefined) await pending;
}
