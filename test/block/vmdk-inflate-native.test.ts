/**
 * The FUSE workers' decoder for vmdk grains (native-fuse/inflate.c, codes
 * `zlib-wrapped` and `vmdk-marker`) against JavaScript's (vmdk/stream.ts),
 * on the same bytes in a file: every grain of a streamOptimized image made
 * by qemu-img inflates to the same bytes both ways, as mapped by the driver;
 * and on hand-made grains the native decoder accepts only what JavaScript
 * accepts, with the same output (a marker length of 0, past the bytes, or
 * cutting the stream; a bad Adler-32; a stream longer or shorter than a
 * grain; raw deflate without the zlib header: all refused natively).
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { deflateRawSync, deflateSync } from 'node:zlib';
import { inflateGrainBytes } from '../../src/block/format/vmdk/stream.js';
import { openImage } from '../../src/block/open-image.js';
import type { CompressedHost } from '../../src/block/types.js';
import { ALGORITHM_CODES, loadFuse3 } from '../../src/export/fuse/fuse3.js';
import { needTools, qemuImg, randomBytes, seededRandom, tempDir } from '../helpers/tools.js';
import { inflateJs } from './read-via-map.js';

const GRAIN = 64 * 1024;

function addon() {
  const a = loadFuse3();
  if (!a) assert.fail('the libfuse 3 binding is not built');
  return a;
}

/**
 * The native decoder on `bytes` written to a file at offset 4096 (null:
 * refused), given as many of them as the driver's mapping gives it (read.ts,
 * compressedGrain): up to two grains after a marker, one grain without.
 */
function nativeOn(dir: string, bytes: Buffer, algorithm: CompressedHost['algorithm']): Buffer | null {
  const path = join(dir, 'grain.bin');
  writeFileSync(path, Buffer.concat([Buffer.alloc(4096, 0xee), bytes]));
  const clen = Math.min(bytes.length, algorithm === 'vmdk-marker' ? 2 * GRAIN : GRAIN);
  const fd = openSync(path, 'r');
  try {
    return addon().inflateCluster(fd, 4096, clen, Math.log2(GRAIN), ALGORITHM_CODES[algorithm]);
  } finally {
    closeSync(fd);
  }
}

/** JavaScript's decoder on the same bytes, as the driver reads them (an Error: refused). */
function jsOn(bytes: Buffer, markers: boolean): Promise<Buffer | Error> {
  return inflateGrainBytes(bytes, markers, GRAIN, 'grain.bin', 4096).catch((e: Error) => e);
}

function marker(lba: number, data: Buffer, size = data.length): Buffer {
  const m = Buffer.alloc(12);
  m.writeBigUInt64LE(BigInt(lba), 0);
  m.writeUInt32LE(size, 8);
  return Buffer.concat([m, data]);
}

test('vmdk grains of a qemu-img streamOptimized image inflate natively to what JavaScript gives', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t, 'blkexport-test-');
  const rand = seededRandom(3);
  const raw = Buffer.alloc(4 * 1024 * 1024);
  for (let at = 0; at < raw.length; at += GRAIN) {
    if (rand() < 0.3) continue;
    const word = randomBytes(rand, 32);
    for (let i = 0; i < GRAIN; i += 32) word.copy(raw, at + i);
    randomBytes(rand, 4096).copy(raw, at + Math.floor(rand() * 15) * 4096);
  }
  writeFileSync(join(dir, 'src.raw'), raw);
  const img = join(dir, 'disk.vmdk');
  qemuImg(
    'convert',
    '-q',
    '-f',
    'raw',
    '-O',
    'vmdk',
    '-o',
    'subformat=streamOptimized',
    join(dir, 'src.raw'),
    img,
  );
  const opened = await openImage({ filename: img, format: 'vmdk', readOnly: true });
  t.after(() => opened.close());
  const node = opened.node;
  await node.read(0, Buffer.alloc(raw.length)); // caches the grain tables
  let grains = 0;
  for (const x of node.mapHostCached!(0, raw.length)!) {
    if (!('compressed' in x)) continue;
    const c = x.compressed;
    assert.equal(c.algorithm, 'vmdk-marker');
    const input = Buffer.alloc(c.clen);
    readSync(c.fd, input, 0, c.clen, c.host);
    const js = await inflateJs(c, input);
    const native = addon().inflateCluster(
      c.fd,
      c.host,
      c.clen,
      Math.log2(c.clusterSize),
      ALGORITHM_CODES[c.algorithm],
    );
    assert.ok(native, `grain at ${c.host} inflates natively`);
    assert.ok(native.equals(js), `grain at ${c.host}: native and JavaScript agree`);
    grains++;
  }
  assert.ok(grains > 20, `${grains} compressed grains compared`);
});

test('hand-made grains: the native decoder accepts only what JavaScript accepts, with the same bytes', async (t) => {
  const dir = tempDir(t, 'blkexport-test-');
  // Half random, half text: the stream fits in one grain (random data alone would not).
  const grain = randomBytes(seededRandom(9), GRAIN);
  grain.fill('blkexport ', GRAIN / 2);
  const z = deflateSync(grain);
  const incompressible = deflateSync(randomBytes(seededRandom(10), GRAIN));
  const cases: [string, Buffer, boolean, boolean][] = [
    // name, bytes, markers, native must accept
    ['marker + stream', marker(7, z), true, true],
    ['marker + stream + trailing bytes', Buffer.concat([marker(7, z), Buffer.alloc(900, 0x11)]), true, true],
    ['marker length 0', marker(7, z, 0), true, false],
    ['marker length past the bytes', marker(7, z, z.length + 1), true, false],
    ['marker length cuts the stream', marker(7, z, z.length - 1), true, false],
    ['marker cut off', Buffer.from([1, 2, 3, 4, 5]), true, false],
    [
      'bad Adler-32',
      marker(7, Buffer.concat([z.subarray(0, -1), Buffer.from([z.at(-1)! ^ 1])])),
      true,
      false,
    ],
    ['a stream longer than a grain', marker(7, deflateSync(Buffer.alloc(GRAIN + 512))), true, false],
    ['a stream shorter than a grain', marker(7, deflateSync(grain.subarray(0, 4096))), true, false],
    ['raw deflate (no zlib header)', marker(7, deflateRawSync(grain)), true, false],
    ['no marker: stream', z, false, true],
    ['no marker: stream + trailing bytes', Buffer.concat([z, Buffer.alloc(700, 0x22)]), false, true],
    ['no marker: truncated', z.subarray(0, z.length - 3), false, false],
    // Longer than a grain: JavaScript reads one grain of it, so the stream is cut off (both refuse).
    ['no marker: a stream of more than a grain', incompressible, false, false],
    ['marker + a stream of more than a grain', marker(7, incompressible), true, true],
  ];
  for (const [name, bytes, markers, accept] of cases) {
    const native = nativeOn(dir, bytes, markers ? 'vmdk-marker' : 'zlib-wrapped');
    const js = await jsOn(bytes, markers);
    assert.equal(native !== null, accept, `${name}: native ${native ? 'accepts' : 'refuses'}`);
    if (native) {
      assert.ok(!(js instanceof Error), `${name}: JavaScript refuses what the native decoder accepts`);
      assert.ok(native.equals(js), `${name}: the same bytes`);
    }
  }
  // What JavaScript serves but the workers leave to it: a short grain (a stream's last).
  assert.ok(!((await jsOn(marker(7, deflateSync(grain.subarray(0, 4096))), true)) instanceof Error));
});
