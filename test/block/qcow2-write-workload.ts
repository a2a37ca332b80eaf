/**
 * Seeded write workloads for the qcow2 write tests: writes of 1 B – 1 MiB
 * (mostly small, unaligned, overlapping), write-zeroes, discards and flushes,
 * applied to a block node and to an in-memory reference of the guest bytes.
 */
import type { BlockNode } from '../../src/block/types.js';
import { randomBytes, seededRandom } from '../helpers/tools.js';

export interface WorkloadOptions {
  ops: number;
  /** Largest write (default 1 MiB). */
  maxLen?: number;
  zeroes?: boolean;
  discards?: boolean;
}

/** A length between 1 and max, skewed towards small ones. */
function pickLen(rand: () => number, max: number): number {
  const r = rand();
  if (r < 0.35) return 1 + Math.floor(rand() * 4096);
  if (r < 0.7) return 1 + Math.floor(rand() * 70000);
  return 1 + Math.floor(rand() * max);
}

/** Runs a seeded workload on `node`, mirroring every change into `ref` (the expected guest bytes). */
export async function runWorkload(
  node: BlockNode,
  ref: Buffer,
  seed: number,
  o: WorkloadOptions,
): Promise<void> {
  const rand = seededRandom(seed);
  const size = node.length();
  const maxLen = Math.min(o.maxLen ?? 1024 * 1024, size);
  for (let i = 0; i < o.ops; i++) {
    const r = rand();
    const len = pickLen(rand, maxLen);
    const off = Math.floor(rand() * (size - len + 1));
    if (r < 0.08) {
      await node.flush();
    } else if (o.zeroes && r < 0.16) {
      await node.writeZeroes(off, len, { mayUnmap: rand() < 0.5 });
      ref.fill(0, off, off + len);
    } else if (o.discards && r < 0.22) {
      await node.discard(off, len);
      // Discarded bytes are unspecified but stable: take what the node reads now.
      const back = Buffer.alloc(len);
      await node.read(off, back);
      back.copy(ref, off);
    } else if (r < 0.32) {
      // A batch of concurrent writes into disjoint byte ranges that may share clusters.
      const jobs: Promise<void>[] = [];
      let at = Math.floor(rand() * (size / 2));
      for (let j = 0; j < 8 && at < size; j++) {
        const n = Math.min(1 + Math.floor(rand() * 20000), size - at);
        const data = randomBytes(rand, n);
        jobs.push(node.write(at, data));
        data.copy(ref, at);
        at += n + Math.floor(rand() * 3000);
      }
      await Promise.all(jobs);
    } else {
      const data = randomBytes(rand, len);
      await node.write(off, data);
      data.copy(ref, off);
    }
  }
}
