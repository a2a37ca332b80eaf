/**
 * Creating qcow2 images. The file starts as the smallest valid image — the
 * header (with the backing name and format), a one-cluster refcount table and
 * one refcount block counting clusters 0..2, no L1 table, size 0 — and is then
 * opened writable and resized through the driver, so the L1 table, refcount
 * blocks and table growth all go through the same crash-safe code as guest
 * writes.
 */
import { writeFile } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { BlkError } from '../../../errors.js';
import { openImage } from '../../open-image.js';
import { EXT_BACKING_FORMAT } from './extensions.js';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_EXTL2, MAX_BACKING_NAME, QCOW2_MAGIC } from './header.js';

/** What `blkexport create -f qcow2` may ask for. */
export interface Qcow2CreateOptions {
  /** Virtual size in bytes (rounded up to 512); taken from the backing file when undefined. */
  size: number | undefined;
  clusterSize?: number;
  compat?: '0.10' | '1.1';
  refcountBits?: number;
  extendedL2?: boolean;
  lazyRefcounts?: boolean;
  backingFile?: string;
  backingFormat?: string;
}

/** The options after defaults and checks (what was created). */
export interface Qcow2Created {
  size: number;
  clusterSize: number;
  compat: '0.10' | '1.1';
  refcountBits: number;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  backingFile: string | undefined;
  backingFormat: string | undefined;
}

function usage(file: string, field: string, msg: string): BlkError {
  return new BlkError('USAGE', msg, { file, field });
}

/** Checks the options and fills in the defaults QEMU uses (64 KiB clusters, compat 1.1, 16-bit refcounts). */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
export async function resolveCreateOptions(path: string, o: Qcow2CreateOptions): Promise<Qcow2Created> {
  const cs = o.clusterSize ?? 65536;
  if (!Number.isInteger(cs) || cs < 512 || cs > 2 * 1024 * 1024 || (cs & (cs - 1)) !== 0) {
    throw usage(path, 'cluster_size', `cluster size ${cs} must be a power of two between 512 and 2M`);
  }
  const compat = o.compat ?? '1.1';
  const bits = o.refcountBits ?? 16;
  if (![1, 2, 4, 8, 16, 32, 64].includes(bits)) {
    throw usage(path, 'refcount_bits', `refcount bits ${bits} must be a power of two up to 64`);
  }
  if (compat === '0.10' && bits !== 16) {
    throw usage(path, 'refcount_bits', 'compat 0.10 (version 2) images need 16-bit refcounts');
  }
  const extendedL2 = o.extendedL2 ?? false;
  if (extendedL2 && compat === '0.10')
    throw usage(path, 'extended_l2', 'extended L2 entries need compat 1.1');
  if (extendedL2 && cs < 16384)
    throw usage(path, 'extended_l2', 'extended L2 entries need clusters of at least 16k');
  const lazy = o.lazyRefcounts ?? false;
  if (lazy && compat === '0.10') throw usage(path, 'lazy_refcounts', 'lazy refcounts need compat 1.1');
  if (o.backingFile !== undefined) {
    if (o.backingFormat === undefined) {
      throw usage(path, 'backing_format', 'a backing file needs its format (--backing-format raw|qcow2)');
    }
    if (o.backingFormat !== 'raw' && o.backingFormat !== 'qcow2') {
      throw usage(
        path,
        'backing_format',
        `backing format '${o.backingFormat}' is not supported (raw or qcow2)`,
      );
    }
    if (Buffer.byteLength(o.backingFile) > MAX_BACKING_NAME || o.backingFile.includes('\0')) {
      throw usage(path, 'backing_file', 'backing file name is too long or contains a NUL byte');
    }
  } else if (o.backingFormat !== undefined) {
    throw usage(path, 'backing_format', '--backing-format needs --backing');
  }
  let size = o.size;
  if (size === undefined) {
    if (o.backingFile === undefined)
      throw usage(path, 'size', 'a size is needed (or a backing file to take it from)');
    const name = isAbsolute(o.backingFile) ? o.backingFile : resolve(dirname(resolve(path)), o.backingFile);
    const b = await openImage({
      filename: name,
      format: o.backingFormat as 'raw' | 'qcow2',
      readOnly: true,
      backing: 'none',
    });
    size = b.node.length();
    await b.close();
  }
  if (!Number.isSafeInteger(size) || size < 0) throw usage(path, 'size', `invalid size ${size}`);
  size = Math.ceil(size / 512) * 512;
  return {
    size,
    clusterSize: cs,
    compat,
    refcountBits: bits,
    extendedL2,
    lazyRefcounts: lazy,
    backingFile: o.backingFile,
    backingFormat: o.backingFile === undefined ? undefined : o.backingFormat,
  };
}

/** The first three clusters of an empty image (size 0, no L1 table). */
function skeleton(c: Qcow2Created): Buffer {
  const cs = c.clusterSize;
  const v3 = c.compat === '1.1';
  const buf = Buffer.alloc(3 * cs);
  const headerLength = v3 ? 112 : 72;
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(v3 ? 3 : 2, 4);
  buf.writeUInt32BE(Math.log2(cs), 20);
  buf.writeBigUInt64BE(BigInt(cs), 48); // refcount table at cluster 1
  buf.writeUInt32BE(1, 56);
  if (v3) {
    buf.writeBigUInt64BE(c.extendedL2 ? INCOMPAT_EXTL2 : 0n, 72);
    buf.writeBigUInt64BE(c.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n, 80);
    buf.writeUInt32BE(Math.log2(c.refcountBits), 96);
    buf.writeUInt32BE(headerLength, 100);
  }
  let at = headerLength;
  if (c.backingFile !== undefined) {
    const fmt = Buffer.from(c.backingFormat!, 'latin1');
    buf.writeUInt32BE(EXT_BACKING_FORMAT, at);
    buf.writeUInt32BE(fmt.length, at + 4);
    fmt.copy(buf, at + 8);
    at += 8 + Math.ceil(fmt.length / 8) * 8;
  }
  at += 8; // end of extensions (type 0, length 0)
  if (c.backingFile !== undefined) {
    const name = Buffer.from(c.backingFile, 'utf8');
    if (at + name.length > cs) throw usage('', 'backing_file', 'backing file name does not fit in cluster 0');
    buf.writeBigUInt64BE(BigInt(at), 8);
    buf.writeUInt32BE(name.length, 16);
    name.copy(buf, at);
  }
  // Refcount table entry 0 → the block at cluster 2; the block counts clusters 0, 1, 2.
  buf.writeBigUInt64BE(BigInt(2 * cs), cs);
  const block = buf.subarray(2 * cs);
  for (let i = 0; i < 3; i++) {
    const bit = i * c.refcountBits;
    if (c.refcountBits >= 8) {
      const bytes = c.refcountBits / 8;
      block[(i + 1) * bytes - 1] = 1; // big-endian 1
    } else {
      block[Math.floor(bit / 8)]! |= 1 << (bit % 8);
    }
  }
  return buf;
}

/** Creates (or overwrites) a qcow2 image at `path`; returns what was created. */
export async function createQcow2Image(path: string, o: Qcow2CreateOptions): Promise<Qcow2Created> {
  const c = await resolveCreateOptions(path, o);
  await writeFile(path, skeleton(c));
  const img = await openImage({ filename: path, format: 'qcow2', readOnly: false, backing: 'none' });
  try {
    if (c.size > 0) await img.node.truncate(c.size);
  } finally {
    await img.close();
  }
  return c;
}
