/** The seeded operation list shared by the crash test and its child process. */
import { randomBytes, seededRandom } from '../helpers/tools.js';

export interface CrashOp {
  kind: 'write' | 'zero' | 'discard' | 'flush';
  off: number;
  len: number;
  data?: Buffer;
  unmap: boolean;
}

/** `n` operations over a disk of `size` bytes: mostly writes up to 96 KiB, some zeroes, a flush every few. */
export function crashOps(size: number, seed: number, n: number): CrashOp[] {
  const rand = seededRandom(seed);
  const out: CrashOp[] = [];
  for (let i = 0; i < n; i++) {
    const r = rand();
    const len = 1 + Math.floor(rand() * (rand() < 0.5 ? 4096 : 96 * 1024));
    const off = Math.floor(rand() * (size - len));
    if (r < 0.15) out.push({ kind: 'flush', off: 0, len: 0, unmap: false });
    else if (r < 0.22) out.push({ kind: 'zero', off, len, unmap: rand() < 0.5 });
    else if (r < 0.26) out.push({ kind: 'discard', off, len, unmap: true });
    else out.push({ kind: 'write', off, len, data: randomBytes(rand, len), unmap: false });
  }
  return out;
}

/**
 * The bytes after operations 0..upto on top of `base`, and the mask of bytes some later
 * operation may have changed (discards make their range unknown too).
 */
export function expectedAfter(
  base: Buffer,
  ops: CrashOp[],
  upto: number,
): { ref: Buffer; unsure: Uint8Array } {
  const ref = Buffer.from(base);
  const unsure = new Uint8Array(base.length);
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i]!;
    if (op.kind === 'flush') continue;
    if (i > upto || op.kind === 'discard') {
      unsure.fill(1, op.off, op.off + op.len);
      continue;
    }
    if (op.kind === 'write') op.data!.copy(ref, op.off);
    else ref.fill(0, op.off, op.off + op.len);
    unsure.fill(0, op.off, op.off + op.len);
  }
  return { ref, unsure };
}
