/**
 * Hostile and broken NBD clients against the server (raw sockets on a Unix
 * socket, every loop bounded): bad magics and flags, unknown and oversized
 * options and commands, requests past the end or beyond the payload limit,
 * writes to a read-only export, clients that vanish mid-request, 1000 idle
 * connections, a per-export connection limit, and a client that does not
 * read its replies. Each case ends with the server alive and a fresh
 * client reading the right bytes; the suite ends with nbdinfo reading too.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type OpenedImage, openImage } from '../../src/block/open-image.js';
import * as C from '../../src/export/nbd/constants.js';
import { encodeInfoRequest } from '../../src/export/nbd/options.js';
import { NbdServer } from '../../src/export/nbd/server.js';
import type { NbdExportEntry } from '../../src/export/nbd/types.js';
import { RawClient, sh } from '../helpers/nbd.js';
import { missingTools, qemuImg, qemuIo } from '../helpers/tools.js';

const MAX_PAYLOAD = 1024 * 1024;

describe('NBD server against hostile clients', { timeout: 120_000 }, () => {
  const state: { server?: NbdServer; ro?: OpenedImage; rw?: OpenedImage } = {};
  let sock = '';
  let ref: Buffer;
  let roEntry: NbdExportEntry;
  let limited: NbdExportEntry;

  let dir = '';
  // The server and images close before the directory goes, also when a test failed.
  after(async () => {
    await state.server?.close();
    await state.ro?.close();
    await state.rw?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  before(async () => {
    missingTools('qemu-img', 'qemu-io');
    dir = mkdtempSync(join(tmpdir(), 'blkexport-nbd-hostile-'));
    const img = join(dir, 'ro.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '8M');
    qemuIo(img, '-c', 'write -P 0x61 0 1M', '-c', 'write -P 0x62 3M 100k');
    qemuImg('convert', '-f', 'qcow2', '-O', 'raw', img, join(dir, 'ref.raw'));
    ref = readFileSync(join(dir, 'ref.raw'));
    const rwImg = join(dir, 'rw.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', rwImg, '8M');
    state.ro = await openImage({ filename: img, readOnly: true });
    state.rw = await openImage({ filename: rwImg, readOnly: false });
    state.server = new NbdServer({ limits: { maxPayload: MAX_PAYLOAD, handshakeSeconds: 3 } });
    roEntry = state.server.addExport({ name: 'ro', node: state.ro.node, writable: false });
    state.server.addExport({ name: 'rw', node: state.rw.node, writable: true });
    limited = state.server.addExport({
      name: 'limited',
      node: state.ro.node,
      writable: false,
      maxConnections: 2,
    });
    sock = join(dir, 'nbd.sock');
    await state.server.listen({ kind: 'unix', path: sock });
  });

  /** A fresh client negotiates, reads 2 ranges and gets the image's bytes. */
  async function assertHealthy(): Promise<void> {
    const c = await RawClient.open(sock);
    try {
      await c.goStructured('ro');
      for (const [off, len] of [
        [0, 4096],
        [3 * 1024 * 1024 - 10, 5000],
      ] as const) {
        c.request(C.CMD_READ, C.CMD_FLAG_DF, 9n, off, len);
        const [chunk] = await c.reply();
        assert.equal(chunk!.type, C.REPLY_TYPE_OFFSET_DATA);
        assert.ok(chunk!.payload.subarray(8).equals(ref.subarray(off, off + len)));
      }
    } finally {
      c.destroy();
    }
  }

  /** The error value of a structured error reply to `handle`. */
  async function errorOf(c: RawClient, handle: bigint): Promise<number> {
    const chunks = await c.reply();
    const last = chunks[chunks.length - 1]!;
    assert.equal(last.handle, handle);
    assert.ok(last.type & 0x8000, `expected an error chunk, got type ${last.type}`);
    return last.payload.readUInt32BE(0);
  }

  test('unknown client flags and a bad option magic end only that connection', async () => {
    const a = await RawClient.open(sock);
    await a.read(18);
    a.write(Buffer.from([0xff, 0xff, 0xff, 0xff]));
    assert.ok(await a.closedWithin(2000));
    const b = await RawClient.open(sock);
    await b.hello();
    b.write(Buffer.alloc(16, 0x41));
    assert.ok(await b.closedWithin(2000));
    await assertHealthy();
  });

  test('unknown, malformed and oversized options get errors and the connection goes on', async () => {
    const c = await RawClient.open(sock);
    await c.hello();
    c.sendOption(999, Buffer.from('junk'));
    assert.equal((await c.optionReply()).type, C.REP_ERR_UNSUP);
    c.sendOption(C.OPT_GO, Buffer.from([0, 0, 0, 200, 1, 2]));
    assert.equal((await c.optionReply()).type, C.REP_ERR_INVALID);
    c.sendOption(C.OPT_GO, encodeInfoRequest('nope', []));
    assert.equal((await c.optionReply()).type, C.REP_ERR_UNKNOWN);
    c.sendOption(C.OPT_LIST, Buffer.from('x'));
    assert.equal((await c.optionReply()).type, C.REP_ERR_INVALID);
    c.sendOption(C.OPT_SET_META_CONTEXT, Buffer.alloc(12));
    assert.equal((await c.optionReply()).type, C.REP_ERR_INVALID); // structured replies not negotiated
    c.sendOption(C.OPT_STARTTLS);
    assert.equal((await c.optionReply()).type, C.REP_ERR_POLICY); // no TLS configured
    c.sendOption(C.OPT_INFO, Buffer.alloc(100 * 1024, 7)); // skipped, refused
    assert.equal((await c.optionReply()).type, C.REP_ERR_TOO_BIG);
    c.sendOption(C.OPT_LIST);
    const list = await c.optionReplies();
    assert.equal(list.filter((r) => r.type === C.REP_SERVER).length, 3);
    c.destroy();

    const huge = await RawClient.open(sock);
    await huge.hello();
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(C.IHAVEOPT, 0);
    h.writeUInt32BE(C.OPT_INFO, 8);
    h.writeUInt32BE(0xffffffff, 12); // 4 GiB of option data: not even skipped
    huge.write(h);
    assert.ok(await huge.closedWithin(2000));
    await assertHealthy();
  });

  test('requests past the end, beyond the payload limit, unknown or with bad flags get errors', async () => {
    const c = await RawClient.open(sock);
    const { size, flags } = await c.goStructured('ro');
    assert.equal(size, 8n * 1024n * 1024n);
    assert.ok(flags & C.FLAG_READ_ONLY);
    const cases: Array<[number, number, bigint, number, number]> = [
      [C.CMD_READ, 0, size, 1, C.NBD_EINVAL],
      [C.CMD_READ, 0, 2n ** 64n - 1n, 4096, C.NBD_EINVAL],
      [C.CMD_READ, 0, 0n, MAX_PAYLOAD + 1, C.NBD_EOVERFLOW],
      [42, 0, 0n, 0, C.NBD_EINVAL],
      [C.CMD_READ, 1 << 9, 0n, 512, C.NBD_EINVAL],
      [C.CMD_BLOCK_STATUS, 0, size - 1n, 2, C.NBD_EINVAL],
      [C.CMD_WRITE_ZEROES, 0, 0n, 512, C.NBD_EPERM],
      [C.CMD_TRIM, 0, 0n, 512, C.NBD_EPERM],
    ];
    let handle = 100n;
    for (const [type, fl, off, len, want] of cases) {
      c.request(type, fl, ++handle, off, len);
      assert.equal(await errorOf(c, handle), want, `command ${type} at ${off}+${len}`);
    }
    // A write to a read-only export: refused, its payload read and dropped, the stream still in step.
    c.request(C.CMD_WRITE, 0, ++handle, 0, 70000, Buffer.alloc(70000, 1));
    assert.equal(await errorOf(c, handle), C.NBD_EPERM);
    c.request(C.CMD_WRITE, 0, ++handle, 0, MAX_PAYLOAD + 5, Buffer.alloc(MAX_PAYLOAD + 5, 2));
    assert.equal(await errorOf(c, handle), C.NBD_EPERM);
    // Misaligned reads are fine (minimum block size 1).
    c.request(C.CMD_READ, C.CMD_FLAG_DF, ++handle, 3 * 1024 * 1024 + 7, 13);
    const [chunk] = await c.reply();
    assert.ok(chunk!.payload.subarray(8).equals(ref.subarray(3 * 1024 * 1024 + 7, 3 * 1024 * 1024 + 20)));
    c.request(C.CMD_DISC, 0, ++handle, 0, 0);
    assert.ok(await c.closedWithin(2000));

    // On a writable export: an oversized write is refused and skipped, the next one lands.
    const w = await RawClient.open(sock);
    await w.goStructured('rw');
    w.request(C.CMD_WRITE, 0, 1n, 0, MAX_PAYLOAD + 5, Buffer.alloc(MAX_PAYLOAD + 5, 2));
    assert.equal(await errorOf(w, 1n), C.NBD_EOVERFLOW);
    w.request(C.CMD_WRITE, 0, 2n, (8 << 20) - 100, 200, Buffer.alloc(200, 2));
    assert.equal(await errorOf(w, 2n), C.NBD_ENOSPC);
    w.request(C.CMD_WRITE, C.CMD_FLAG_FUA, 3n, 4096, 512, Buffer.alloc(512, 9));
    assert.equal((await w.reply())[0]!.type, C.REPLY_TYPE_NONE);
    w.request(C.CMD_READ, C.CMD_FLAG_DF, 4n, 4096, 512);
    assert.ok((await w.reply())[0]!.payload.subarray(8).equals(Buffer.alloc(512, 9)));
    w.destroy();
    await assertHealthy();
  });

  test('clients that vanish mid-request (half a write payload, replies never read)', async () => {
    for (let i = 0; i < 5; i++) {
      const w = await RawClient.open(sock);
      await w.goStructured('rw');
      w.request(C.CMD_WRITE, 0, 1n, 0, 512 * 1024, Buffer.alloc(200 * 1024, 3)); // 312 KiB missing
      const r = await RawClient.open(sock);
      await r.goStructured('ro');
      for (let h = 0; h < 20; h++) r.request(C.CMD_READ, 0, BigInt(h), h * 65536, 65536);
      w.destroy();
      r.destroy();
    }
    await assertHealthy();
    // The half-sent write never reached the image: a write is all or nothing.
    const c = await RawClient.open(sock);
    await c.goStructured('rw');
    c.request(C.CMD_READ, C.CMD_FLAG_DF, 1n, 0, 4096);
    const [chunk] = await c.reply();
    assert.ok(chunk!.payload.subarray(8).equals(Buffer.alloc(4096)));
    c.destroy();
  });

  test('1000 idle connections: others are served, and the handshake deadline ends the idle ones', async () => {
    const idle: RawClient[] = [];
    try {
      for (let i = 0; i < 1000; i++) idle.push(await RawClient.open(sock));
      await assertHealthy();
      // The deadline is 3 s from each connect; the connects took a while: wait for the last one's.
      for (let i = 0; i < 100 && idle.some((c) => !c.isClosed); i++)
        await new Promise((r) => setTimeout(r, 100));
      assert.ok(await idle[999]!.closedWithin(4000), 'an idle client outlived the handshake deadline');
      const open = idle.filter((c) => !c.isClosed).length;
      assert.equal(open, 0, `${open} idle connections still open after the deadline`);
    } finally {
      for (const c of idle) c.destroy();
    }
    await assertHealthy();
  });

  test('connections per export are limited; the limit refuses politely and frees up', async () => {
    const held = [await RawClient.open(sock), await RawClient.open(sock)];
    for (const c of held) await c.goStructured('limited');
    assert.equal(limited.connections, 2);
    const third = await RawClient.open(sock);
    await third.hello();
    third.sendOption(C.OPT_GO, encodeInfoRequest('limited', []));
    const r = await third.optionReply();
    assert.equal(r.type, C.REP_ERR_POLICY);
    assert.match(r.data.toString(), /maximum of 2 connections/);
    held[0]!.destroy();
    for (let i = 0; i < 50 && limited.connections > 1; i++) await new Promise((res) => setTimeout(res, 20));
    third.sendOption(C.OPT_GO, encodeInfoRequest('limited', []));
    const ok = await third.optionReplies();
    assert.equal(ok[ok.length - 1]!.type, C.REP_ACK);
    third.destroy();
    held[1]!.destroy();
    await assertHealthy();
  });

  test('a client that does not read its replies holds back its own requests, not server memory', async () => {
    const c = await RawClient.open(sock);
    await c.goStructured('ro');
    c.sock.pause(); // stop reading: replies pile up in the server's socket
    const n = 400;
    const len = 256 * 1024;
    const before = roEntry.stats.reads;
    for (let h = 0; h < n; h++)
      c.request(C.CMD_READ, C.CMD_FLAG_DF, BigInt(h), (h * len) % (8 * 1024 * 1024), len);
    await new Promise((res) => setTimeout(res, 1500));
    const served = roEntry.stats.reads - before;
    // Unbounded buffering would have answered all 400 (100 MiB queued); backpressure stops near 8 MiB.
    assert.ok(served < 120, `${served} reads answered to a client that reads nothing`);
    await assertHealthy();
    c.sock.resume();
    // Replies may come in any order (requests run side by side): each handle once, with its bytes.
    const seen = new Set<bigint>();
    for (let i = 0; i < n; i++) {
      const [chunk] = await c.reply();
      const h = Number(chunk!.handle);
      assert.ok(!seen.has(chunk!.handle) && h < n);
      seen.add(chunk!.handle);
      const off = (h * len) % (8 * 1024 * 1024);
      assert.ok(chunk!.payload.subarray(8).equals(ref.subarray(off, off + len)));
    }
    c.destroy();
  });

  test('after all that, nbdinfo reads the export', async (t) => {
    if (missingTools('nbdinfo').length) return t.skip('missing: nbdinfo');
    const out = (await sh('nbdinfo', [`nbd+unix:///ro?socket=${sock}`])).toString();
    assert.match(out, /export-size: 8388608/);
    await assertHealthy();
  });
});
