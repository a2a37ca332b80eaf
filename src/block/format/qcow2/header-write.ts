/**
 * In-place header updates. Each update is one small write inside the first
 * sector (so it lands whole) followed by a sync: the header switches from one
 * consistent state to the next (refcount table moved, L1 table moved, size,
 * dirty and corrupt bits).
 */
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from './header.js';
import type { Qcow2State } from './state.js';

const TWO32 = 2 ** 32;

function u64(v: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

async function writeSynced(s: Qcow2State, at: number, buf: Buffer): Promise<void> {
  await s.file.write(at, buf);
  await s.file.flush();
}

/** Switches the header to the refcount table at `offset` (`clusters` long), durably. */
export async function writeRefcountTableHeader(
  s: Qcow2State,
  offset: number,
  clusters: number,
): Promise<void> {
  const b = Buffer.alloc(12);
  b.writeUInt32BE(Math.floor(offset / TWO32), 0);
  b.writeUInt32BE((offset % TWO32) >>> 0, 4);
  b.writeUInt32BE(clusters, 8);
  await writeSynced(s, 48, b);
}

/** Switches the header to the L1 table at `offset` with `size` entries, durably. */
export async function writeL1Header(s: Qcow2State, offset: number, size: number): Promise<void> {
  const b = Buffer.alloc(12);
  b.writeUInt32BE(size, 0);
  b.writeUInt32BE(Math.floor(offset / TWO32), 4);
  b.writeUInt32BE((offset % TWO32) >>> 0, 8);
  await writeSynced(s, 36, b);
}

/** Writes the virtual size, durably. */
export async function writeSizeHeader(s: Qcow2State, size: number): Promise<void> {
  await writeSynced(s, 24, u64(size));
}

/** Writes the incompatible feature bits (v3 only), durably. */
export async function writeIncompatible(s: Qcow2State, bits: bigint): Promise<void> {
  if (s.header.version !== 3) return;
  await writeSynced(s, 72, u64(bits));
  s.header.incompatible = bits;
}

/** Writes the autoclear feature bits (v3 only), durably. */
export async function writeAutoclear(s: Qcow2State, bits: bigint): Promise<void> {
  if (s.header.version !== 3) return;
  await writeSynced(s, 88, u64(bits));
  s.header.autoclear = bits;
}

/** Sets or clears the dirty bit (lazy refcounts), durably. */
export async function setDirtyBit(s: Qcow2State, dirty: boolean): Promise<void> {
  const bits = dirty ? s.header.incompatible | INCOMPAT_DIRTY : s.header.incompatible & ~INCOMPAT_DIRTY;
  if (bits !== s.header.incompatible) await writeIncompatible(s, bits);
}

/** Sets the corrupt bit so that no writer (QEMU included) touches the image again. */
export async function markCorrupt(s: Qcow2State): Promise<void> {
  if (s.readOnly || (s.header.incompatible & INCOMPAT_CORRUPT) !== 0n) return;
  await writeIncompatible(s, s.header.incompatible | INCOMPAT_CORRUPT);
}
