/**
 * Reads a guest range the way the FUSE fast path would: through the host
 * extents a node reports from its caches (mapHostCached), with preads, zero
 * fill, and JavaScript's inflation for compressed clusters and grains.
 */
import assert from 'node:assert/strict';
import { readSync } from 'node:fs';
import { decompressCluster } from '../../src/block/format/qcow2/decompress.js';
import { inflateGrainBytes } from '../../src/block/format/vmdk/stream.js';
import type { BlockNode, CompressedHost } from '../../src/block/types.js';

/** What JavaScript inflates from a compressed extent's bytes (qcow2 clusters, vmdk grains). */
export function inflateJs(c: CompressedHost, input: Buffer): Promise<Buffer> {
  if (c.algorithm === 'zlib' || c.algorithm === 'zstd')
    return decompressCluster(c.algorithm, input, c.clusterSize);
  // A vmdk grain: with markers JavaScript reads up to two grains after the marker, without one grain (clen).
  return inflateGrainBytes(input, c.algorithm === 'vmdk-marker', c.clusterSize, 'extent', c.host);
}

/** The bytes at [off, off+len) read through the host extents; undefined when the node cannot map them. */
export async function readViaMap(node: BlockNode, off: number, len: number): Promise<Buffer | undefined> {
  const map = node.mapHostCached?.(off, len);
  if (!map) return undefined;
  const out = Buffer.alloc(len);
  let at = 0;
  for (const x of map) {
    if ('compressed' in x) {
      const c = x.compressed;
      const input = Buffer.alloc(c.clen);
      readSync(c.fd, input, 0, c.clen, c.host);
      const cluster = await inflateJs(c, input);
      cluster.copy(out, at, c.skip, c.skip + x.length);
    } else if (!('zero' in x)) {
      let done = 0;
      while (done < x.length) {
        const n = readSync(x.fd, out, at + done, x.length - done, x.host + done);
        if (n === 0) break; // past the host file's end: zeroes
        done += n;
      }
    }
    at += x.length;
  }
  assert.equal(at, len, 'extents cover exactly the range');
  return out;
}
