/**
 * The read path: map the guest range (mapping.ts), then fill each piece —
 * file bytes through the log-replayed view, zeroes, the parent's bytes, and
 * for a partially present block the sectors its chunk's bitmap marks present
 * from the file and the others from the parent.
 */
import { bitmapIndex, entryOffset, entryState, payloadIndex } from './bat.js';
import { corrupt } from './errors.js';
import { SB_PRESENT } from './layout.js';
import { BAD, DATA, mapGuest, PARENT, PARTIAL, type Piece, ZERO } from './mapping.js';
import type { VhdxState } from './state.js';

/** Fills `buf` with the guest bytes at `offset`. */
export async function readGuest(s: VhdxState, offset: number, buf: Buffer): Promise<void> {
  const pieces = mapGuest(s.geo, s.bat, offset, buf.length);
  const bad = pieces.find((p) => p.kind === BAD);
  if (bad && bad.kind === BAD) throw corrupt(s.path, `bat[${bad.index}]`, bad.why);
  if (pieces.length === 1 && pieces[0]!.kind === DATA) return s.view.read(pieces[0]!.host, buf);
  const jobs: Promise<void>[] = [];
  let at = 0;
  for (const p of pieces) {
    const out = buf.subarray(at, at + p.length);
    const guest = offset + at;
    if (p.kind === DATA) jobs.push(s.view.read(p.host, out));
    else if (p.kind === ZERO) out.fill(0);
    else if (p.kind === PARENT) jobs.push(readParent(s, guest, out));
    else if (p.kind === PARTIAL) jobs.push(readPartial(s, p, guest, out));
    at += p.length;
  }
  if (jobs.length === 0) return;
  // Wait for every job before failing: none may write into buf after we return.
  const results = await Promise.allSettled(jobs);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

/** The parent's bytes at `guest`; zeroes past its end or without a parent. */
export async function readParent(s: VhdxState, guest: number, out: Buffer): Promise<void> {
  const parent = s.parent;
  const avail = parent === null ? 0 : Math.max(0, Math.min(out.length, parent.length() - guest));
  if (avail < out.length) out.fill(0, avail);
  if (avail > 0) await parent!.read(guest, avail === out.length ? out : out.subarray(0, avail));
}

/** A partially present block: runs of sectors from the file (bit set) or the parent (bit clear). */
async function readPartial(
  s: VhdxState,
  p: Extract<Piece, { kind: typeof PARTIAL }>,
  guest: number,
  out: Buffer,
): Promise<void> {
  const g = s.geo;
  const j = bitmapIndex(g, p.block);
  if (entryState(s.bat, j) !== SB_PRESENT) {
    throw corrupt(
      s.path,
      `bat[${j}]`,
      `block ${p.block} is partially present but its chunk has no sector bitmap`,
    );
  }
  const lss = g.logicalSectorSize;
  const first = Math.floor(p.inBlock / lss);
  const last = Math.floor((p.inBlock + p.length - 1) / lss);
  // Bit k of the chunk's bitmap is logical sector k of the chunk.
  const base = (p.block % g.chunkRatio) * (g.blockSize / lss);
  const byte0 = Math.floor((base + first) / 8);
  const bits = await s.view.bytes(entryOffset(s.bat, j) + byte0, Math.floor((base + last) / 8) - byte0 + 1);
  const present = (sector: number) => {
    const k = base + sector - byte0 * 8;
    return ((bits[k >>> 3]! >>> (k & 7)) & 1) === 1;
  };
  const host = entryOffset(s.bat, payloadIndex(g, p.block));
  const jobs: Promise<void>[] = [];
  for (let sec = first; sec <= last; ) {
    const here = present(sec);
    let end = sec + 1;
    while (end <= last && present(end) === here) end++;
    const from = Math.max(sec * lss, p.inBlock) - p.inBlock;
    const to = Math.min(end * lss, p.inBlock + p.length) - p.inBlock;
    const part = out.subarray(from, to);
    jobs.push(here ? s.view.read(host + p.inBlock + from, part) : readParent(s, guest + from, part));
    sec = end;
  }
  const results = await Promise.allSettled(jobs);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}
