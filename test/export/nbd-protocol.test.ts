/**
 * The NBD server's pure parts: message encoding, option payload parsing,
 * metadata context selection, request checks, advertised sizes and flags,
 * listen addresses and PSK files. Byte layouts are checked field by field
 * against the protocol document's offsets.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import * as C from '../../src/export/nbd/constants.js';
import { transmissionFlags } from '../../src/export/nbd/flags.js';
import { blockSizes, checkRequest, type RequestContext } from '../../src/export/nbd/limits.js';
import { formatListen, parseListen } from '../../src/export/nbd/listen.js';
import { allocationFlags, contextFlags, pushDescriptor, selectContexts } from '../../src/export/nbd/meta.js';
import {
  decodeString,
  encodeInfoRequest,
  encodeMetaContextRequest,
  infoBlockSize,
  infoExport,
  parseInfoRequest,
  parseMetaContextRequest,
  repServer,
} from '../../src/export/nbd/options.js';
import { parsePskFile } from '../../src/export/nbd/tls.js';
import {
  decodeOptionHeader,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeDataChunkHeader,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeHoleChunk,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
} from '../../src/export/nbd/wire.js';

const H = Buffer.from('0102030405060708', 'hex');

describe('wire', () => {
  test('greeting: NBDMAGIC, IHAVEOPT, fixed newstyle and no-zeroes', () => {
    const g = encodeGreeting();
    assert.equal(g.length, 18);
    assert.equal(g.subarray(0, 8).toString('latin1'), 'NBDMAGIC');
    assert.equal(g.subarray(8, 16).toString('latin1'), 'IHAVEOPT');
    assert.equal(g.readUInt16BE(16), 3);
  });

  test('option header and reply', () => {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(C.IHAVEOPT, 0);
    h.writeUInt32BE(C.OPT_GO, 8);
    h.writeUInt32BE(42, 12);
    assert.deepEqual(decodeOptionHeader(h), { magicOk: true, option: C.OPT_GO, length: 42 });
    h[0] = 0;
    assert.equal(decodeOptionHeader(h).magicOk, false);
    const r = encodeOptionReply(C.OPT_LIST, C.REP_ERR_UNSUP, Buffer.from('no'));
    assert.equal(r.readBigUInt64BE(0), 0x3e889045565a9n);
    assert.equal(r.readUInt32BE(8), C.OPT_LIST);
    assert.equal(r.readUInt32BE(12), 0x80000001);
    assert.equal(r.readUInt32BE(16), 2);
    assert.equal(r.subarray(20).toString(), 'no');
  });

  test('EXPORT_NAME reply with and without the 124 zero bytes', () => {
    assert.equal(encodeExportNameReply(1 << 20, 1, false).length, 134);
    const short = encodeExportNameReply(2 ** 40, 0x103, true);
    assert.equal(short.length, 10);
    assert.equal(short.readBigUInt64BE(0), 2n ** 40n);
    assert.equal(short.readUInt16BE(8), 0x103);
  });

  test('request round trip keeps a 64-bit offset exact', () => {
    const b = encodeRequest(C.CMD_WRITE, C.CMD_FLAG_FUA, 0xdeadbeefcafen, 2n ** 63n + 5n, 4096);
    const r = decodeRequest(b);
    assert.equal(r.magicOk, true);
    assert.equal(r.type, C.CMD_WRITE);
    assert.equal(r.flags, C.CMD_FLAG_FUA);
    assert.equal(r.handle.readBigUInt64BE(0), 0xdeadbeefcafen);
    assert.equal(r.offset, 2n ** 63n + 5n);
    assert.equal(r.length, 4096);
  });

  test('simple reply and structured chunks', () => {
    const s = encodeSimpleReply(C.NBD_EIO, H);
    assert.equal(s.readUInt32BE(0), 0x67446698);
    assert.equal(s.readUInt32BE(4), 5);
    assert.deepEqual(s.subarray(8), H);

    const d = encodeDataChunkHeader(H, 1000, 512, true);
    assert.equal(d.readUInt32BE(0), 0x668e33ef);
    assert.equal(d.readUInt16BE(4), C.REPLY_FLAG_DONE);
    assert.equal(d.readUInt16BE(6), C.REPLY_TYPE_OFFSET_DATA);
    assert.equal(d.readUInt32BE(16), 8 + 512);
    assert.equal(d.readBigUInt64BE(20), 1000n);

    const hole = encodeHoleChunk(H, 4096, 65536, false);
    assert.equal(hole.length, 32);
    assert.equal(hole.readUInt16BE(4), 0);
    assert.equal(hole.readUInt16BE(6), C.REPLY_TYPE_OFFSET_HOLE);
    assert.equal(hole.readUInt32BE(16), 12);
    assert.equal(hole.readUInt32BE(28), 65536);

    const bs = encodeBlockStatusChunk(
      H,
      7,
      [
        { length: 512, flags: 3 },
        { length: 1024, flags: 0 },
      ],
      true,
    );
    assert.equal(bs.readUInt32BE(16), 4 + 16);
    assert.equal(bs.readUInt32BE(20), 7);
    assert.deepEqual(
      [bs.readUInt32BE(24), bs.readUInt32BE(28), bs.readUInt32BE(32), bs.readUInt32BE(36)],
      [512, 3, 1024, 0],
    );

    const e = encodeErrorChunk(H, C.NBD_EINVAL, 'bad', 77);
    assert.equal(e.readUInt16BE(6), C.REPLY_TYPE_ERROR_OFFSET);
    assert.equal(e.readUInt32BE(16), 6 + 3 + 8);
    assert.equal(e.readUInt32BE(20), 22);
    assert.equal(e.readUInt16BE(24), 3);
    assert.equal(e.subarray(26, 29).toString(), 'bad');
    assert.equal(e.readBigUInt64BE(29), 77n);
    assert.equal(encodeErrorChunk(H, 5, '').readUInt16BE(6), C.REPLY_TYPE_ERROR);
  });
});

describe('option payloads', () => {
  test('INFO/GO round trip', () => {
    const p = parseInfoRequest(encodeInfoRequest('wéb', [C.INFO_NAME, C.INFO_BLOCK_SIZE]));
    assert.deepEqual(p, { ok: true, value: { name: 'wéb', infos: [1, 3] } });
  });

  test('malformed INFO/GO data is invalid, never a throw', () => {
    const good = encodeInfoRequest('abc', [1]);
    const lying = Buffer.from(good);
    lying.writeUInt32BE(1000, 0); // name longer than the data
    const count = Buffer.from(good);
    count.writeUInt16BE(5, 7); // more info requests than bytes
    const nul = encodeInfoRequest('a\0b', []);
    const badUtf8 = Buffer.concat([Buffer.from([0, 0, 0, 2, 0xc3, 0x28]), Buffer.from([0, 0])]);
    for (const b of [Buffer.alloc(3), lying, count, nul, badUtf8, good.subarray(0, good.length - 1)]) {
      assert.equal(parseInfoRequest(b).ok, false);
    }
  });

  test('META_CONTEXT round trip and malformed data', () => {
    const b = encodeMetaContextRequest('x', ['base:allocation', 'qemu:']);
    assert.deepEqual(parseMetaContextRequest(b), {
      ok: true,
      value: { name: 'x', queries: ['base:allocation', 'qemu:'] },
    });
    const hugeCount = Buffer.from(b);
    hugeCount.writeUInt32BE(0xffffffff, 5);
    assert.equal(parseMetaContextRequest(hugeCount).ok, false);
    assert.equal(parseMetaContextRequest(Buffer.concat([b, Buffer.from([0])])).ok, false);
    assert.equal(parseMetaContextRequest(b.subarray(0, b.length - 2)).ok, false);
  });

  test('strings longer than 4096 bytes are refused', () => {
    assert.equal(decodeString(Buffer.alloc(4096, 0x61))?.length, 4096);
    assert.equal(decodeString(Buffer.alloc(4097, 0x61)), undefined);
  });

  test('info replies', () => {
    const e = infoExport(2 ** 33, 0x10f);
    assert.equal(e.readUInt16BE(0), C.INFO_EXPORT);
    assert.equal(e.readBigUInt64BE(2), 2n ** 33n);
    assert.equal(e.readUInt16BE(10), 0x10f);
    const bs = infoBlockSize(1, 65536, 32 << 20);
    assert.deepEqual(
      [bs.readUInt16BE(0), bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)],
      [3, 1, 65536, 32 << 20],
    );
    const s = repServer('web', 'web disk');
    assert.equal(s.readUInt32BE(0), 3);
    assert.equal(s.subarray(4).toString(), 'webweb disk');
  });
});

describe('metadata contexts', () => {
  test('LIST lists everything for no query and for a namespace wildcard; SET selects only full names', () => {
    assert.deepEqual(selectContexts([], 'list'), ['base:allocation', 'qemu:allocation-depth']);
    assert.deepEqual(selectContexts(['qemu:'], 'list'), ['qemu:allocation-depth']);
    assert.deepEqual(selectContexts(['qemu:allocation-depth', 'base:allocation'], 'set').sort(), [
      'base:allocation',
      'qemu:allocation-depth',
    ]);
    assert.deepEqual(selectContexts([], 'set'), []);
    assert.deepEqual(selectContexts(['base:'], 'list'), ['base:allocation']);
    assert.deepEqual(selectContexts(['base:'], 'set'), []);
    assert.deepEqual(selectContexts(['base:allocation', 'base:allocation'], 'set'), ['base:allocation']);
    assert.deepEqual(selectContexts(['qemu:dirty-bitmap:x', 'base:nothing', 'x-y:z'], 'set'), []);
  });

  test('qemu:allocation-depth: the layer, or 1 for data / 0 for nothing where a node has no layers', () => {
    assert.equal(
      contextFlags('qemu:allocation-depth', { offset: 0, length: 1, data: false, zero: true, depth: 3 }),
      3,
    );
    assert.equal(contextFlags('qemu:allocation-depth', { offset: 0, length: 1, data: true, zero: false }), 1);
    assert.equal(contextFlags('qemu:allocation-depth', { offset: 0, length: 1, data: false, zero: true }), 0);
    assert.equal(
      contextFlags('base:allocation', { offset: 0, length: 1, data: false, zero: true, depth: 1 }),
      3,
    );
  });

  test('base:allocation flags and descriptor merging', () => {
    assert.equal(allocationFlags({ data: true, zero: false }), 0);
    assert.equal(allocationFlags({ data: false, zero: true }), C.STATE_HOLE | C.STATE_ZERO);
    assert.equal(allocationFlags({ data: true, zero: true }), C.STATE_ZERO);
    const out: Array<{ length: number; flags: number }> = [];
    pushDescriptor(out, 512, 0);
    pushDescriptor(out, 512, 0);
    pushDescriptor(out, 4096, 3);
    assert.deepEqual(out, [
      { length: 1024, flags: 0 },
      { length: 4096, flags: 3 },
    ]);
  });
});

describe('limits', () => {
  const rc: RequestContext = {
    size: 1 << 20,
    writable: true,
    maxPayload: 65536,
    structured: true,
    contexts: 1,
    canTrim: true,
    canZero: true,
  };
  const req = (type: number, offset: bigint | number, length: number, flags = 0) => ({
    type,
    flags,
    offset: BigInt(offset),
    length,
  });
  const err = (v: ReturnType<typeof checkRequest>) => (v.ok ? 0 : v.error);

  test('a request inside the export runs', () => {
    assert.deepEqual(checkRequest(req(C.CMD_READ, 4096, 4096), rc), { ok: true, offset: 4096 });
    assert.equal(err(checkRequest(req(C.CMD_READ, (1 << 20) - 1, 1), rc)), 0);
    assert.equal(
      err(checkRequest(req(C.CMD_WRITE_ZEROES, 0, 1 << 20, C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO), rc)),
      0,
    );
  });

  test('past the end: EINVAL for reads, ENOSPC for writes, also where offset+length overflows 64 bits', () => {
    assert.equal(err(checkRequest(req(C.CMD_READ, 1 << 20, 1), rc)), C.NBD_EINVAL);
    assert.equal(err(checkRequest(req(C.CMD_WRITE, (1 << 20) - 1, 2), rc)), C.NBD_ENOSPC);
    assert.equal(err(checkRequest(req(C.CMD_WRITE_ZEROES, 2n ** 64n - 1n, 4096), rc)), C.NBD_ENOSPC);
    assert.equal(err(checkRequest(req(C.CMD_BLOCK_STATUS, 2n ** 64n - 1n, 1), rc)), C.NBD_EINVAL);
    assert.equal(err(checkRequest(req(C.CMD_TRIM, 2n ** 53n + 1n, 1), rc)), C.NBD_EINVAL);
  });

  test('oversized payloads, unknown commands and flags, read-only writes', () => {
    assert.equal(err(checkRequest(req(C.CMD_READ, 0, 65537), rc)), C.NBD_EOVERFLOW);
    assert.equal(err(checkRequest(req(C.CMD_WRITE, 0, 65537), rc)), C.NBD_EOVERFLOW);
    assert.equal(err(checkRequest(req(C.CMD_TRIM, 0, 1 << 20), rc)), 0); // no payload: may exceed it
    assert.equal(err(checkRequest(req(99, 0, 0), rc)), C.NBD_EINVAL);
    assert.equal(err(checkRequest(req(C.CMD_READ, 0, 1, C.CMD_FLAG_NO_HOLE), rc)), C.NBD_EINVAL);
    assert.equal(err(checkRequest(req(C.CMD_READ, 0, 1, 1 << 15), rc)), C.NBD_EINVAL);
    const ro = { ...rc, writable: false };
    for (const t of [C.CMD_WRITE, C.CMD_WRITE_ZEROES, C.CMD_TRIM]) {
      assert.equal(err(checkRequest(req(t, 0, 1), ro)), C.NBD_EPERM);
    }
    assert.equal(err(checkRequest(req(C.CMD_FLUSH, 0, 0, C.CMD_FLAG_FUA), ro)), 0);
    assert.equal(err(checkRequest(req(C.CMD_FLUSH, 1, 0), rc)), C.NBD_EINVAL);
    assert.equal(err(checkRequest(req(C.CMD_BLOCK_STATUS, 0, 1), { ...rc, contexts: 0 })), C.NBD_EINVAL);
    assert.equal(
      err(checkRequest(req(C.CMD_READ, 0, 1, C.CMD_FLAG_DF), { ...rc, structured: false })),
      C.NBD_EINVAL,
    );
  });

  test('block sizes: minimum 1, preferred the cluster size (at least 512), maximum the limit', () => {
    assert.deepEqual(blockSizes(65536, 32 << 20), { minimum: 1, preferred: 65536, maximum: 32 << 20 });
    assert.equal(blockSizes(undefined, 32 << 20).preferred, 4096);
    assert.equal(blockSizes(256, 32 << 20).preferred, 512);
    assert.equal(blockSizes(2 << 20, 1 << 20).preferred, 512);
    assert.equal(blockSizes(3000, 32 << 20).preferred, 4096);
  });

  test('transmission flags: read-only exports advertise no write commands; multi-conn always', () => {
    const ro = transmissionFlags({ writable: false, canTrim: true, structured: false });
    assert.ok(ro & C.FLAG_READ_ONLY && ro & C.FLAG_CAN_MULTI_CONN && ro & C.FLAG_SEND_FLUSH);
    assert.equal(ro & (C.FLAG_SEND_WRITE_ZEROES | C.FLAG_SEND_TRIM | C.FLAG_SEND_DF), 0);
    const rw = transmissionFlags({ writable: true, canTrim: false, structured: true });
    assert.equal(rw & C.FLAG_READ_ONLY, 0);
    assert.ok(rw & C.FLAG_SEND_WRITE_ZEROES && rw & C.FLAG_SEND_FAST_ZERO && rw & C.FLAG_SEND_DF);
    assert.equal(rw & C.FLAG_SEND_TRIM, 0);
  });
});

describe('configuration', () => {
  test('listen addresses', () => {
    assert.deepEqual(parseListen('unix:/run/x.sock'), { kind: 'unix', path: '/run/x.sock' });
    assert.deepEqual(parseListen('tcp:127.0.0.1:10809'), { kind: 'tcp', host: '127.0.0.1', port: 10809 });
    assert.deepEqual(parseListen('tcp:[::1]:0'), { kind: 'tcp', host: '::1', port: 0 });
    assert.equal(formatListen(parseListen('tcp:[::1]:10809')), 'tcp:[::1]:10809');
    for (const bad of ['unix:rel.sock', 'tcp:host', 'tcp:h:70000', 'udp:x', '']) {
      assert.throws(() => parseListen(bad), /USAGE|expected|absolute/);
    }
  });

  test('PSK files: identity:hexkey lines', () => {
    const keys = parsePskFile('alice:0123456789abcdef\n\nbob:ff00\n', 'k.psk');
    assert.deepEqual([...keys.keys()], ['alice', 'bob']);
    assert.equal(keys.get('alice')!.toString('hex'), '0123456789abcdef');
    assert.throws(() => parsePskFile('alice:xyz\n', 'k.psk'), /k\.psk:1/);
    assert.throws(() => parsePskFile('nocolon\n', 'k.psk'), /k\.psk:1/);
    assert.throws(() => parsePskFile('\n', 'k.psk'), /no identity/);
  });
});
