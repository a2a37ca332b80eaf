/**
 * The seeded operations of the write-before-acknowledge test, shared by the
 * test and its child process, and the bytes the parent expects after a kill.
 */
import { randomBytes, seededRandom } from '../helpers/tools.js';

export interface AckOp {
  kind: 'write' | 'zero' | 'discard' | 'flush';
  off: number;
  len: number;
  /** Seed of a write's data (randomBytes(seededRandom(seed), len)). */
  seed: number;
  unmap: boolean;
}

/** The data of a write op. */
export function opData(op: AckOp): Buffer {
  return randomBytes(seededRandom(op.seed), op.len);
}

/**
 * `n` operations over a disk of `size` bytes with `cluster`-byte clusters:
 * mostly writes (half small, some cluster-aligned whole clusters, some up to
 * 96 KiB), write-zeroes with and without unmap, discards, and rare flushes.
 */
export function ackOps(size: number, cluster: number, seed: number, n: number): AckOp[] {
  const rand = seededRandom(seed);
  const out: AckOp[] = [];
  for (let i = 0; i < n; i++) {
    const r = rand();
    const shape = rand();
    let len: number;
    let off: number;
    if (shape < 0.25) {
      // Whole clusters, aligned: a fresh allocation without copy-on-write.
      len = cluster * (1 + Math.floor(rand() * 3));
      off = Math.floor(rand() * (size / cluster - 3)) * cluster;
    } else {
      len = 1 + Math.floor(rand() * (shape < 0.7 ? 4096 : 96 * 1024));
      off = Math.floor(rand() * (size - len));
    }
    len = Math.min(len, size - off);
    const opSeed = (seed * 7919 + i * 104729) >>> 0;
    if (r < 0.02) out.push({ kind: 'flush', off: 0, len: 0, seed: 0, unmap: false });
    else if (r < 0.12) out.push({ kind: 'zero', off, len, seed: 0, unmap: rand() < 0.5 });
    else if (r < 0.17) out.push({ kind: 'discard', off, len, seed: 0, unmap: true });
    else out.push({ kind: 'write', off, len, seed: opSeed, unmap: false });
  }
  return out;
}

/** Whether two ops touch a common byte (flushes touch none). */
export function overlaps(a: AckOp, b: AckOp): boolean {
  return a.len > 0 && b.len > 0 && a.off < b.off + b.len && b.off < a.off + a.len;
}

/**
 * The bytes after a killed run on top of `base`: the child never runs two
 * overlapping ops at once and starts them in index order, so applying the
 * acknowledged ops in index order gives the content; an op started but not
 * acknowledged (and every discard, a hint) leaves its range unknown.
 */
export function expectedAfterKill(
  base: Buffer,
  ops: AckOp[],
  started: Set<number>,
  acked: Set<number>,
): { ref: Buffer; unsure: Uint8Array; owner: Int32Array } {
  const ref = Buffer.from(base);
  const unsure = new Uint8Array(base.length);
  const owner = new Int32Array(base.length).fill(-1);
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i]!;
    if (op.kind === 'flush' || !started.has(i)) continue;
    if (!acked.has(i) || op.kind === 'discard') {
      unsure.fill(1, op.off, op.off + op.len);
      continue;
    }
    if (op.kind === 'write') opData(op).copy(ref, op.off);
    else ref.fill(0, op.off, op.off + op.len);
    unsure.fill(0, op.off, op.off + op.len);
    owner.fill(i, op.off, op.off + op.len);
  }
  return { ref, unsure, owner };
}
