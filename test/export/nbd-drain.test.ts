/**
 * Removing an NBD export while a client has requests running: the client
 * gets every reply of those requests, whole, and then the connection
 * closes; a new client no longer finds the export. The client does not
 * read until the export is being removed, so the replies (32 MiB) sit in
 * the server's queue, far beyond what the socket itself buffers: cutting
 * the connection instead of draining it would lose them.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { openImage } from '../../src/block/open-image.js';
import * as C from '../../src/export/nbd/constants.js';
import { encodeInfoRequest } from '../../src/export/nbd/options.js';
import { NbdServer } from '../../src/export/nbd/server.js';
import { RawClient } from '../helpers/nbd.js';
import { randomBytes, seededRandom } from '../helpers/tools.js';

const MIB = 1024 * 1024;
/** Reads of 1 MiB each, all running when the export goes: far more than a socket buffers. */
const COUNT = 8;

test('a removed export answers the requests in flight, then closes; new clients do not find it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'blkexport-nbd-drain-'));
  const data = randomBytes(seededRandom(7), COUNT * MIB);
  const file = join(dir, 'disk.raw');
  writeFileSync(file, data);
  const img = await openImage({ filename: file, format: 'raw', readOnly: true });
  const server = new NbdServer();
  // After-hooks run in order: the server and the image close, then the directory goes.
  t.after(async () => {
    await server.close();
    await img.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const entry = server.addExport({ name: 'd', node: img.node, writable: false });
  const sock = join(dir, 'nbd.sock');
  await server.listen({ kind: 'unix', path: sock });

  const c = await RawClient.open(sock);
  t.after(() => c.destroy());
  await c.goStructured('d');
  for (let i = 0; i < COUNT; i++) c.request(C.CMD_READ, C.CMD_FLAG_DF, BigInt(i), i * MIB, MIB);
  for (let i = 0; i < 200 && entry.stats.reads < COUNT; i++) await sleep(25);
  assert.equal(entry.stats.reads, COUNT, 'the server did not run every read');

  const removed = server.removeExport('d');
  for (let i = 0; i < COUNT; i++) {
    const [chunk] = await c.reply();
    assert.equal(chunk!.type, C.REPLY_TYPE_OFFSET_DATA);
    const n = Number(chunk!.handle);
    assert.ok(chunk!.payload.subarray(8).equals(data.subarray(n * MIB, (n + 1) * MIB)), `reply ${n} wrong`);
  }
  assert.ok(await c.closedWithin(5000), 'the connection stayed open after its replies');
  await removed;

  const late = await RawClient.open(sock);
  t.after(() => late.destroy());
  await late.hello();
  late.sendOption(C.OPT_GO, encodeInfoRequest('d', []));
  const replies = await late.optionReplies();
  assert.equal(replies[replies.length - 1]!.type, C.REP_ERR_UNKNOWN);
});
