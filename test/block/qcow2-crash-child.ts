/**
 * Child process of the crash test: opens a qcow2 image writable through the
 * block layer and runs a seeded workload of writes, write-zeroes and discards,
 * flushing every few operations. After each flush returns it prints
 * `F <index>` (operations 0..index are then durable); the parent kills it
 * with SIGKILL at a random moment. Usage: qcow2-crash-child.ts IMAGE SEED OPS
 */
import { openImage } from '../../src/block/open-image.js';
import { crashOps } from './qcow2-crash-ops.js';

const [img, seedArg, opsArg] = process.argv.slice(2);
const o = await openImage({ filename: img!, readOnly: false });
const ops = crashOps(o.node.length(), Number(seedArg), Number(opsArg));
process.stdout.write('R\n');
for (let i = 0; i < ops.length; i++) {
  const op = ops[i]!;
  if (op.kind === 'write') await o.node.write(op.off, op.data!);
  else if (op.kind === 'zero') await o.node.writeZeroes(op.off, op.len, { mayUnmap: op.unmap });
  else if (op.kind === 'discard') await o.node.discard(op.off, op.len);
  else {
    await o.node.flush();
    process.stdout.write(`F ${i}\n`);
  }
}
await o.close();
process.stdout.write('D\n');
