/**
 * The qcow2 read path: map the guest range, then read each extent straight
 * into the caller's buffer — host-contiguous clusters coalesced into one
 * pread, zeroes filled, unallocated ranges from the backing node, compressed
 * clusters through a small decompressed-cluster cache.
 */
import { decompressCluster } from './decompress.js';
import {
  COMPRESSED,
  DATA,
  type MappedExtent,
  mapRange,
  mapRangeCached,
  UNALLOCATED,
  ZERO,
} from './mapping.js';
import { corruption, type Qcow2State } from './state.js';

/** Fills `buf` with the guest bytes at [offset, offset+buf.length). */
export async function readGuest(s: Qcow2State, offset: number, buf: Buffer): Promise<void> {
  const extents: MappedExtent[] = [];
  if (!mapRangeCached(s, offset, buf.length, extents)) {
    extents.length = 0;
    await mapRange(s, offset, buf.length, extents);
  }
  if (extents.length === 1 && extents[0]!.kind === DATA) return s.data.read(extents[0]!.host, buf);
  const jobs: Promise<void>[] = [];
  let at = 0;
  for (const x of extents) {
    const a = at;
    const b = at + x.length;
    switch (x.kind) {
      case DATA:
        jobs.push(s.data.read(x.host, buf.subarray(a, b)));
        break;
      case ZERO:
        buf.fill(0, a, b);
        break;
      case UNALLOCATED:
        if (s.backing === null) buf.fill(0, a, b);
        else jobs.push(readBacking(s, offset + a, buf.subarray(a, b)));
        break;
      case COMPRESSED:
        jobs.push(readCompressed(s, x, buf.subarray(a, b)));
        break;
    }
    at = b;
  }
  if (jobs.length === 0) return;
  // Wait for every job before failing: none may write into buf after we return.
  const results = await Promise.allSettled(jobs);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

async function readBacking(s: Qcow2State, offset: number, buf: Buffer): Promise<void> {
  const backing = s.backing!;
  const avail = Math.max(0, Math.min(buf.length, backing.length() - offset));
  if (avail < buf.length) buf.fill(0, avail);
  if (avail > 0) await backing.read(offset, avail === buf.length ? buf : buf.subarray(0, avail));
}

async function readCompressed(s: Qcow2State, x: MappedExtent, buf: Buffer): Promise<void> {
  const cluster =
    s.compressedCache.peek(x.host) ??
    (await s.compressedCache.get(x.host, () => loadCompressed(s, x.host, x.clen)));
  cluster.copy(buf, 0, x.skip, x.skip + buf.length);
}

async function loadCompressed(s: Qcow2State, host: number, clen: number): Promise<Buffer> {
  const input = Buffer.allocUnsafe(clen);
  await s.file.read(host, input);
  try {
    return await decompressCluster(s.header.compressionType, input, s.header.clusterSize);
  } catch (e) {
    throw corruption(
      s,
      'l2_entry',
      `compressed cluster at ${host} does not decompress: ${(e as Error).message}`,
    );
  }
}
