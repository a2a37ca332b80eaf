/**
 * Decompressing one compressed cluster: zlib clusters are raw deflate
 * (window 2^12, no header), zstd clusters are plain zstd frames. The input is
 * untrusted: output is capped at one cluster and must be exactly one cluster.
 */
import { constants, inflateRaw } from 'node:zlib';
import { Decompress } from 'fzstd';
import { BlkError } from '../../../errors.js';
import type { CompressionType } from './header.js';

/** Decompresses `input` into a fresh buffer of exactly `clusterSize` bytes; throws Error on bad data. */
export async function decompressCluster(
  type: CompressionType,
  input: Buffer,
  clusterSize: number,
): Promise<Buffer> {
  return type === 'zlib' ? inflateCluster(input, clusterSize) : unzstdCluster(input, clusterSize);
}

function inflateCluster(input: Buffer, clusterSize: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    inflateRaw(
      input,
      { windowBits: 12, maxOutputLength: clusterSize, finishFlush: constants.Z_SYNC_FLUSH },
      (err, out) => {
        if (err) return reject(err);
        if (out.length !== clusterSize) {
          return reject(
            new BlkError('IMAGE_CORRUPT', `deflate data gave ${out.length} bytes instead of ${clusterSize}`),
          );
        }
        resolve(out);
      },
    );
  });
}

const ZSTD_MAGIC = 0xfd2fb528;
const ZSTD_MAX_WINDOW = 8 * 1024 * 1024;

/** Length of the zstd frame at the start of `buf` (the rest is sector padding or another cluster's data). */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
export function zstdFrameLength(buf: Buffer, clusterSize: number): number {
  const bad = (why: string) => new BlkError('IMAGE_CORRUPT', `zstd frame: ${why}`);
  if (buf.length < 6 || buf.readUInt32LE(0) !== ZSTD_MAGIC) throw bad('bad magic');
  const fhd = buf[4]!;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictFlag = fhd & 3;
  if (fhd & 8) throw bad('reserved bit set');
  let pos = 5;
  let window = 0;
  if (!single) {
    const wd = buf[pos++]!;
    const base = 2 ** (10 + (wd >> 3));
    window = base + (base / 8) * (wd & 7);
  }
  const dictBytes = [0, 1, 2, 4][dictFlag]!;
  for (let i = 0; i < dictBytes; i++) if (buf[pos + i]) throw bad('dictionaries are not used by qcow2');
  pos += dictBytes;
  const fcsBytes = [single, 2, 4, 8][fcsFlag]!;
  if (pos + fcsBytes > buf.length) throw bad('truncated header');
  let fcs = -1;
  if (fcsBytes === 1) fcs = buf[pos]!;
  else if (fcsBytes === 2) fcs = buf.readUInt16LE(pos) + 256;
  else if (fcsBytes === 4) fcs = buf.readUInt32LE(pos);
  else if (fcsBytes === 8) fcs = Number(buf.readBigUInt64LE(pos));
  pos += fcsBytes;
  if (fcs >= 0 && fcs !== clusterSize) throw bad(`content size ${fcs} is not one cluster`);
  if (single) window = fcs;
  if (window > ZSTD_MAX_WINDOW) throw bad(`window of ${window} bytes is too large`);
  for (;;) {
    if (pos + 3 > buf.length) throw bad('truncated block header');
    const bh = buf[pos]! | (buf[pos + 1]! << 8) | (buf[pos + 2]! << 16);
    const type = (bh >> 1) & 3;
    if (type === 3) throw bad('reserved block type');
    pos += 3 + (type === 1 ? 1 : bh >>> 3);
    if (pos > buf.length) throw bad('truncated block');
    if (bh & 1) break;
  }
  if (checksum) pos += 4;
  if (pos > buf.length) throw bad('truncated checksum');
  return pos;
}

function unzstdCluster(input: Buffer, clusterSize: number): Buffer {
  const frame = input.subarray(0, zstdFrameLength(input, clusterSize));
  const out = Buffer.allocUnsafe(clusterSize);
  let total = 0;
  const d = new Decompress((chunk) => {
    if (total + chunk.length > clusterSize)
      throw new BlkError('IMAGE_CORRUPT', 'zstd data decompresses to more than one cluster');
    out.set(chunk, total);
    total += chunk.length;
  });
  d.push(frame, true);
  if (total !== clusterSize)
    throw new BlkError('IMAGE_CORRUPT', `zstd data gave ${total} bytes instead of ${clusterSize}`);
  return out;
}
