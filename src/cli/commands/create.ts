/**
 * `blkexport create -f qcow2 IMAGE [SIZE]`: a new qcow2 image, written by
 * blkexport's own block layer, that `qemu-img check` finds clean and
 * `qemu-img info` reads as asked.
 */
import { resolve } from 'node:path';
import { createQcow2Image } from '../../block/format/qcow2/create.js';
import { BlkError } from '../../errors.js';
import { parseCommandArgs } from '../args.js';

export const summary = 'create a qcow2 image (optionally over a backing file)';
export const usage = `usage: blkexport create -f qcow2 IMAGE [SIZE] [--backing FILE --backing-format raw|qcow2]
        [--cluster-size N] [--compat 0.10|1.1] [--refcount-bits N] [--extended-l2] [--lazy-refcounts]

Creates IMAGE (overwriting it). SIZE takes the suffixes k, M, G, T (powers of
1024) and is rounded up to 512 bytes; without SIZE the backing file's size is
used. A relative backing file name is relative to IMAGE's directory.

options:
  -f, --format qcow2        the image format (only qcow2)
  -b, --backing FILE        backing file, recorded in the image as given
  -F, --backing-format F    its format: raw or qcow2 (required with --backing)
  --cluster-size N          512 .. 2M, a power of two (default 64k)
  --compat V                0.10 (version 2) or 1.1 (version 3, default)
  --refcount-bits N         1, 2, 4, 8, 16 (default), 32 or 64 (compat 1.1 for other than 16)
  --extended-l2             subclusters (compat 1.1, clusters of at least 16k)
  --lazy-refcounts          lazy refcounts (compat 1.1)
  -q, --quiet               print nothing
`;

/** Parses a size with an optional k/M/G/T suffix (powers of 1024). */
export function parseSize(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?$/.exec(text.trim());
  if (!m) throw new BlkError('USAGE', `invalid ${what} '${text}'`);
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2]!.toLowerCase()]!;
  const n = Math.round(Number(m[1]) * mult);
  if (!Number.isSafeInteger(n)) throw new BlkError('USAGE', `${what} '${text}' is too large`);
  return n;
}

/** Runs `blkexport create`. */
export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('create', args, {
    format: { type: 'string', short: 'f', default: 'qcow2' },
    backing: { type: 'string', short: 'b' },
    'backing-format': { type: 'string', short: 'F' },
    'cluster-size': { type: 'string' },
    compat: { type: 'string' },
    'refcount-bits': { type: 'string' },
    'extended-l2': { type: 'boolean', default: false },
    'lazy-refcounts': { type: 'boolean', default: false },
    quiet: { type: 'boolean', short: 'q', default: false },
  });
  if (values.format !== 'qcow2')
    throw new BlkError('USAGE', `create supports -f qcow2 only, not '${values.format}'`);
  if (positionals.length < 1 || positionals.length > 2) {
    throw new BlkError('USAGE', 'create needs IMAGE and SIZE (see blkexport create --help)');
  }
  const compat = values.compat;
  if (compat !== undefined && compat !== '0.10' && compat !== '1.1') {
    throw new BlkError('USAGE', `unknown compat '${compat}' (0.10 or 1.1)`);
  }
  const image = positionals[0]!;
  const c = await createQcow2Image(resolve(image), {
    size: positionals[1] === undefined ? undefined : parseSize(positionals[1], 'size'),
    clusterSize:
      values['cluster-size'] === undefined ? undefined : parseSize(values['cluster-size'], 'cluster size'),
    compat,
    refcountBits: values['refcount-bits'] === undefined ? undefined : Number(values['refcount-bits']),
    extendedL2: values['extended-l2'],
    lazyRefcounts: values['lazy-refcounts'],
    backingFile: values.backing,
    backingFormat: values['backing-format'],
  });
  if (!values.quiet) {
    const parts = [`Formatting '${image}', fmt=qcow2 cluster_size=${c.clusterSize}`];
    if (c.compat === '0.10') parts.push('compat=0.10');
    parts.push(`extended_l2=${c.extendedL2 ? 'on' : 'off'}`, 'compression_type=zlib', `size=${c.size}`);
    if (c.backingFile !== undefined)
      parts.push(`backing_file=${c.backingFile}`, `backing_fmt=${c.backingFormat}`);
    parts.push(`lazy_refcounts=${c.lazyRefcounts ? 'on' : 'off'}`, `refcount_bits=${c.refcountBits}`);
    console.log(parts.join(' '));
  }
  return 0;
}
