/**
 * Shared by the vpc, vdi and qed tests: guest contents (sparse, random,
 * zero), images made from them by qemu-img, and the oracle checks (every
 * byte, 2000 random unaligned reads, the fast path's host extents, and
 * `info` against `qemu-img info --output=json`).
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openImage } from '../../src/block/open-image.js';
import type { ProbedFormat } from '../../src/block/probe.js';
import type { BlockNode } from '../../src/block/types.js';
import { imageInfoJson } from '../../src/cli/commands/info.js';
import { BlkError } from '../../src/errors.js';
import { qemuImg, randomBytes, seededRandom } from '../helpers/tools.js';
import { K } from './images.js';
import { readViaMap } from './read-via-map.js';

export type Content = 'sparse' | 'random' | 'zero';
export const CONTENTS: readonly Content[] = ['sparse', 'random', 'zero'];

/** Guest bytes of `size`: scattered random runs in zeroes, all random, or all zero. */
export function guest(kind: Content, size: number, seed: number): Buffer {
  const rand = seededRandom(seed);
  if (kind === 'zero') return Buffer.alloc(size);
  if (kind === 'random') return randomBytes(rand, size);
  const out = Buffer.alloc(size);
  for (let i = 0; i < 12; i++) {
    const off = Math.floor(rand() * size);
    const len = Math.min(size - off, 1 + Math.floor(rand() * 200 * K));
    randomBytes(rand, len).copy(out, off);
  }
  out.fill(0x5a, 0, 700); // the first sector and a bit
  out.fill(0xa5, size - 1000); // the last ones
  return out;
}

/** qemu-img convert of `data` to `format` with `-o opts`; returns the image path. */
export function convertFrom(dir: string, name: string, data: Buffer, format: string, opts: string): string {
  const src = join(dir, `${name}.src`);
  writeFileSync(src, data);
  const img = join(dir, `${name}.${format}`);
  qemuImg('convert', '-q', '-f', 'raw', '-O', format, ...(opts ? ['-o', opts] : []), src, img);
  return img;
}

/** What QEMU reads from the image (`qemu-img convert -O raw`). */
export function qemuRaw(dir: string, img: string, format: string): Buffer {
  const out = join(dir, `${img.split('/').pop()}.ref`);
  qemuImg('convert', '-q', '-U', '-f', format, '-O', 'raw', img, out);
  return readFileSync(out);
}

/** Whole read, 2000 random unaligned reads and the fast path's extents all equal `want`. */
export async function compareNode(node: BlockNode, want: Buffer, seed: number, what: string): Promise<void> {
  assert.equal(node.length(), want.length, `${what}: virtual size`);
  const all = Buffer.alloc(want.length);
  await node.read(0, all);
  assert.ok(all.equals(want), `${what}: whole image differs`);
  const rand = seededRandom(seed);
  let mapped = 0;
  for (let i = 0; i < 2000; i++) {
    const off = Math.floor(rand() * want.length);
    const len = Math.max(
      1,
      Math.min(want.length - off, 1 + Math.floor(rand() * (rand() < 0.9 ? 8 * K : 300 * K))),
    );
    const got = Buffer.alloc(len);
    await node.read(off, got);
    if (!got.equals(want.subarray(off, off + len))) assert.fail(`${what}: read ${off}+${len} differs`);
    if (i % 10 === 0) {
      const viaMap = await readViaMap(node, off, len);
      if (viaMap) {
        mapped++;
        if (!viaMap.equals(want.subarray(off, off + len)))
          assert.fail(`${what}: mapped ${off}+${len} differs`);
      }
    }
  }
  assert.ok(mapped > 0, `${what}: the fast path mapped nothing`);
}

/** Opens `img` natively (read-only, backing followed inside `roots`), checks it against `want`. */
export async function checkImage(
  img: string,
  format: ProbedFormat,
  want: Buffer,
  seed: number,
  roots?: string[],
): Promise<void> {
  const opened = await openImage({ filename: img, format, readOnly: true, allowedRoots: roots });
  try {
    await compareNode(opened.node, want, seed, img);
  } finally {
    await opened.close();
  }
}

const INFO_FIELDS = [
  'virtual-size',
  'format',
  'cluster-size',
  'backing-filename',
  'backing-filename-format',
  'dirty-flag',
  'format-specific',
];

/** `blkexport info -o json` agrees with `qemu-img info --output=json` on every field QEMU reports for the format. */
export async function compareInfo(img: string, format: ProbedFormat): Promise<void> {
  const q = JSON.parse(qemuImg('info', '-U', '-f', format, '--output=json', img)) as Record<string, unknown>;
  const [ours] = await imageInfoJson(img, { format });
  for (const k of INFO_FIELDS) assert.deepEqual(ours![k], q[k], `${img}: info ${k}`);
}

/** An assert.rejects check: a BlkError with `code`, naming `field` (and the image `file` when given). */
export function coded(what: string, code: string, field: string, file?: string) {
  return (e: unknown): boolean => {
    assert.ok(e instanceof BlkError, `${what}: ${String(e)}`);
    assert.equal(e.code, code, `${what}: ${e.message}`);
    assert.equal(e.place.field, field, `${what}: ${e.message}`);
    if (file !== undefined) assert.equal(e.place.file, file, what);
    return true;
  };
}
