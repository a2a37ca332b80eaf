/**
 * The server of passthrough-survival.test.ts: exports a raw image (writable,
 * growable) on a mountpoint file, hands a dup of its /dev/fuse descriptor to
 * a holder process (`sleep`, as the agent's fd holder would keep it), prints
 * `ready <holder pid> <passthrough status as JSON>` and serves until killed.
 *
 *   node --import tsx passthrough-server-child.ts IMAGE MOUNTPOINT
 */
import { spawn } from 'node:child_process';
import { closeSync } from 'node:fs';
import { openImage } from '../../src/block/open-image.js';
import { FuseExport } from '../../src/export/fuse/export.js';

const [image, mountpoint] = process.argv.slice(2);
const img = await openImage({ filename: image!, format: 'raw', readOnly: false });
const exp = await FuseExport.start(img.node, {
  id: 'survival',
  mountpoint: mountpoint!,
  writable: true,
  growable: true,
  allowOther: 'off',
  fsname: 'blkexport-test',
});
const c = exp.connection();
if (!c) throw new Error('no connection to hand over');
const holder = spawn('sleep', ['600'], { stdio: ['ignore', 'ignore', 'ignore', c.fd], detached: true });
closeSync(c.fd);
holder.unref();
process.stdout.write(`ready ${holder.pid} ${JSON.stringify(exp.passthrough)}\n`);
setInterval(() => undefined, 1 << 30);
