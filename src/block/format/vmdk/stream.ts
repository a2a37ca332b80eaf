/**
 * Compressed grains of streamOptimized extents. With markers (header flag
 * bit 17) a grain starts with a 12-byte marker (lba u64, size u32) followed
 * by `size` bytes of zlib data; without, the grain's bytes are the zlib data.
 * As in QEMU, at most two grains' worth of bytes are read for one grain, the
 * data must inflate completely into at most one grain, and a read of a part
 * the data does not cover (a short last grain) is an error. The input is
 * untrusted: the output is capped at one grain.
 */
import { inflate } from 'node:zlib';
import { BlkError } from '../../../errors.js';
import { TableCache } from '../qcow2/table-cache.js';
import type { SparseExtent } from './grains.js';

/** Inflated grains kept per extent (bytes; at least two grains). */
const INFLATED_CACHE_BYTES = 4 * 1024 * 1024;
const MARKER_BYTES = 12;

/** A cache of inflated grains for one compressed extent. */
export function inflatedCache(s: SparseExtent): TableCache {
  return new TableCache(Math.max(INFLATED_CACHE_BYTES, 2 * s.grainBytes), (host) => inflateGrain(s, host));
}

function inflateLimited(input: Buffer, max: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    inflate(input, { maxOutputLength: max }, (err, out) => (err ? reject(err) : resolve(out)));
  });
}

/** Reads and inflates the compressed grain whose marker (or data) starts at `host`. */
export async function inflateGrain(s: SparseExtent, host: number): Promise<Buffer> {
  const avail = Math.min(2 * s.grainBytes, s.fileLength - host);
  if (avail <= 0) throw grainCorrupt(s.path, host, 'it lies past the end of the file');
  const buf = Buffer.allocUnsafe(avail);
  await s.node.read(host, buf);
  return inflateGrainBytes(buf, s.header.markers, s.grainBytes, s.path, host);
}

function grainCorrupt(path: string, host: number, why: string, cause?: unknown): BlkError {
  const field = `compressed grain at ${host}`;
  return new BlkError('IMAGE_CORRUPT', `${field}: ${why}`, { file: path, field }, { cause });
}

/**
 * Inflates a compressed grain from `buf`, the file's bytes from its marker (or
 * data) on, at most two grains of them: with markers, exactly the marker's
 * length of zlib data after it; without, the first grain's worth of bytes.
 * The result is at most one grain. The workers' decoder (native-fuse/inflate.c)
 * accepts a subset of this: only streams that give a whole grain.
 */
export async function inflateGrainBytes(
  buf: Buffer,
  markers: boolean,
  grainBytes: number,
  path: string,
  host: number,
): Promise<Buffer> {
  const avail = buf.length;
  let data: Buffer;
  if (markers) {
    if (avail < MARKER_BYTES)
      throw grainCorrupt(path, host, 'the grain marker is cut off by the end of the file');
    const size = buf.readUInt32LE(8);
    if (size === 0 || size > avail - MARKER_BYTES)
      throw grainCorrupt(
        path,
        host,
        `marker size ${size} is 0 or runs past the grain's ${avail - MARKER_BYTES} bytes`,
      );
    data = buf.subarray(MARKER_BYTES, MARKER_BYTES + size);
  } else {
    data = buf.subarray(0, Math.min(avail, grainBytes));
  }
  try {
    return await inflateLimited(data, grainBytes);
  } catch (e) {
    throw grainCorrupt(
      path,
      host,
      `the zlib data does not inflate into one grain (${(e as Error).message})`,
      e,
    );
  }
}
