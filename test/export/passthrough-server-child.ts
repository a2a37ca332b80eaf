/**
 * The servers of passthrough-survival.test.ts, run with `node --import tsx`:
 *
 *   mount IMAGE MOUNTPOINT   exports a raw image (writable, growable) and hands
 *       a dup of its /dev/fuse descriptor, as fd 3, to a holder process (as
 *       the agent's fd holder keeps it); prints `ready <holder pid> <the
 *       passthrough status as JSON>` and serves until killed.
 *   adopt IMAGE MOUNTPOINT   the successor, started by the holder on SIGUSR2
 *       with the descriptor as fd 3 and the INIT record in BLKEXPORT_TEST_INIT;
 *       prints `adopted <its pid> <the passthrough status as JSON>` and serves.
 *
 * The holder (a few lines of JavaScript, no tsx) shares the first server's
 * stdout, so the test reads every line from one pipe.
 */
import { spawn } from 'node:child_process';
import { closeSync } from 'node:fs';
import { openImage } from '../../src/block/open-image.js';
import { FuseExport, type FuseExportOptions } from '../../src/export/fuse/export.js';

const [role, image, mountpoint] = process.argv.slice(2);
const opts: FuseExportOptions = {
  id: 'survival',
  mountpoint: mountpoint!,
  writable: true,
  growable: true,
  allowOther: 'off',
  fsname: 'blkexport-test',
};
const img = await openImage({ filename: image!, format: 'raw', readOnly: false });
const say = (line: string) => process.stdout.write(`${line}\n`);

if (role === 'adopt') {
  const init = JSON.parse(process.env.BLKEXPORT_TEST_INIT!);
  const exp = await FuseExport.adopt(img.node, opts, { fd: 3, init, allowsOther: false, resend: true });
  say(`adopted ${process.pid} ${JSON.stringify(exp.passthrough)}`);
} else {
  const exp = await FuseExport.start(img.node, opts);
  const c = exp.connection();
  if (!c) throw new Error('no connection to hand over');
  const holderJs = `process.on('SIGUSR2', () => require('child_process').spawn(process.execPath,
    ['--import', 'tsx', ${JSON.stringify(process.argv[1])}, 'adopt', ${JSON.stringify(image)}, ${JSON.stringify(mountpoint)}],
    { stdio: ['ignore', 'inherit', 'inherit', 3], env: { ...process.env, BLKEXPORT_TEST_INIT: ${JSON.stringify(JSON.stringify(c.init))} } }));
    setInterval(() => {}, 1 << 30);`;
  const holder = spawn(process.execPath, ['-e', holderJs], {
    stdio: ['ignore', 'inherit', 'inherit', c.fd],
    detached: true,
  });
  closeSync(c.fd);
  holder.unref();
  say(`ready ${holder.pid} ${JSON.stringify(exp.passthrough)}`);
}
setInterval(() => undefined, 1 << 30);
