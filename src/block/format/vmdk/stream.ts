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
  const field = `compressed grain at ${host}`;
  const corrupt = (why: string, cause?: unknown) =>
    new BlkError('IMAGE_CORRUPT', `compressed grain at ${host}: ${why}`, { file: s.path, field }, { cause });
  const avail = Math.min(2 * s.grainBytes, s.fileLength - host);
  if (avail <= 0) throw corrupt('it lies past the end of the file');
  const buf = Buffer.allocUnsafe(avail);
  await s.node.read(host, buf);
  let data = buf;
  if (s.header.markers) {
    if (avail < MARKER_BYTES) throw corrupt('the grain marker is cut off by the end of the file');
    const size = buf.readUInt32LE(8);
    if (size === 0 || size > avail - MARKER_BYTES)
      throw corrupt(`marker size ${size} is 0 or runs past the grain's ${avail - MARKER_BYTES} bytes`);
    data = buf.subarray(MARKER_BYTES, MARKER_BYTES + size);
  } else {
    data = buf.subarray(0, Math.min(avail, s.grainBytes));
  }
  try {
    return await inflateLimited(data, s.grainBytes);
  } catch (e) {
    throw corrupt(`the zlib data does not inflate into one grain (${(e as Error).message})`, e);
  }
}
