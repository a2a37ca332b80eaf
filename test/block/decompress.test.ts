import assert from 'node:assert/strict';
import { test } from 'node:test';
import { deflateRawSync } from 'node:zlib';
import { decompressCluster, zstdFrameLength } from '../../src/block/format/qcow2/decompress.js';

const CLUSTER = 64 * 1024;

/** A zstd frame of RLE blocks (no content size, 1 MiB window), optionally followed by junk. */
function rleFrame(blocks: number[], byte = 0x5a, opts: { fcs?: number; windowByte?: number } = {}): Buffer {
  const parts: Buffer[] = [Buffer.from([0x28, 0xb5, 0x2f, 0xfd])];
  if (opts.fcs !== undefined) {
    // single segment, 4-byte content size
    const h = Buffer.alloc(5);
    h[0] = (2 << 6) | (1 << 5);
    h.writeUInt32LE(opts.fcs, 1);
    parts.push(h);
  } else {
    parts.push(Buffer.from([0x00, opts.windowByte ?? 0x50]));
  }
  blocks.forEach((n, i) => {
    const last = i === blocks.length - 1 ? 1 : 0;
    const bh = last | (1 << 1) | (n << 3);
    parts.push(Buffer.from([bh & 0xff, (bh >> 8) & 0xff, (bh >> 16) & 0xff, byte]));
  });
  return Buffer.concat(parts);
}

test('zstd: a frame of exactly one cluster decompresses; trailing bytes are ignored', async () => {
  const frame = rleFrame([32768, 32768]);
  assert.equal(zstdFrameLength(Buffer.concat([frame, Buffer.alloc(300, 0xee)]), CLUSTER), frame.length);
  const out = await decompressCluster('zstd', Buffer.concat([frame, Buffer.alloc(300, 0xee)]), CLUSTER);
  assert.ok(out.equals(Buffer.alloc(CLUSTER, 0x5a)));
});

test('zstd: more or less than one cluster, a huge window, a wrong content size or junk are refused', async () => {
  await assert.rejects(
    decompressCluster('zstd', rleFrame([65536, 65536, 65536]), CLUSTER),
    /more than one cluster/,
  );
  await assert.rejects(decompressCluster('zstd', rleFrame([1000]), CLUSTER), /instead of/);
  await assert.rejects(
    decompressCluster('zstd', rleFrame([65536], 0, { windowByte: 0xf8 }), CLUSTER),
    /window/,
  );
  await assert.rejects(
    decompressCluster('zstd', rleFrame([65536], 0, { fcs: 1 << 30 }), CLUSTER),
    /content size/,
  );
  await assert.rejects(decompressCluster('zstd', Buffer.alloc(100, 0xab), CLUSTER), /magic/);
  await assert.rejects(decompressCluster('zstd', rleFrame([65536]).subarray(0, 8), CLUSTER), /truncated/);
});

test('zlib: raw deflate of one cluster decompresses; bombs, short output and junk are refused', async () => {
  const data = Buffer.alloc(CLUSTER, 7);
  const good = deflateRawSync(data, { windowBits: 12 });
  assert.ok(
    (await decompressCluster('zlib', Buffer.concat([good, Buffer.alloc(511, 0x33)]), CLUSTER)).equals(data),
  );
  const bomb = deflateRawSync(Buffer.alloc(64 * CLUSTER), { windowBits: 12 });
  await assert.rejects(decompressCluster('zlib', bomb, CLUSTER));
  await assert.rejects(decompressCluster('zlib', deflateRawSync(Buffer.alloc(100)), CLUSTER), /instead of/);
  await assert.rejects(decompressCluster('zlib', Buffer.alloc(200, 0xff), CLUSTER));
});
