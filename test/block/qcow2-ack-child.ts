/**
 * Child process of the write-before-acknowledge test: opens a qcow2 image
 * writable through the block layer and runs a seeded list of writes,
 * write-zeroes, discards and rare flushes, INFLIGHT at a time (never two that
 * touch a common byte, and in list order). On fd 3 (a pipe to the parent) it
 * reports `S i` before op i starts and `A i kind off len seed` once it has
 * resolved; the parent kills it with SIGKILL at a random moment.
 * Usage: qcow2-ack-child.ts IMAGE CLUSTER SEED OPS INFLIGHT
 */
import { writeSync } from 'node:fs';
import { openImage } from '../../src/block/open-image.js';
import { type AckOp, ackOps, opData, overlaps } from './qcow2-ack-ops.js';

const [img, clusterArg, seedArg, opsArg, inflightArg] = process.argv.slice(2);
const report = (line: string) => writeSync(3, `${line}\n`);
const o = await openImage({ filename: img!, readOnly: false });
const node = o.node;
const ops = ackOps(node.length(), Number(clusterArg), Number(seedArg), Number(opsArg));
const limit = Number(inflightArg);

function runOp(op: AckOp): Promise<void> {
  switch (op.kind) {
    case 'write':
      return node.write(op.off, opData(op));
    case 'zero':
      return node.writeZeroes(op.off, op.len, { mayUnmap: op.unmap });
    case 'discard':
      return node.discard(op.off, op.len);
    default:
      return node.flush();
  }
}

const active = new Map<number, Promise<void>>();
report('R');
for (let i = 0; i < ops.length; i++) {
  const op = ops[i]!;
  for (;;) {
    const blockers = [...active].filter(([j]) => overlaps(ops[j]!, op)).map(([, p]) => p);
    if (blockers.length === 0 && active.size < limit) break;
    await Promise.race(blockers.length > 0 ? blockers : active.values());
  }
  report(`S ${i}`);
  const p = runOp(op).then(() => {
    active.delete(i);
    report(`A ${i} ${op.kind} ${op.off} ${op.len} ${op.seed}`);
  });
  active.set(i, p);
}
await Promise.all(active.values());
await o.close();
report('D');
