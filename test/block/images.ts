/**
 * Test images made with the real qemu-img/qemu-io, holding
 * seeded pseudo-random data at scattered offsets that cross cluster and L2
 * table boundaries and touch the first and last cluster.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuImg, qemuIo, randomBytes, runOk, seededRandom } from '../helpers/tools.js';

export type WriteKind = 'data' | 'zero' | 'zero-unmap' | 'discard' | 'compressed';

export interface Write {
  off: number;
  len: number;
  kind: WriteKind;
}

/** Scattered writes: first and last cluster, around L2-table boundaries, and random places. */
export function scatteredWrites(
  seed: number,
  size: number,
  cluster: number,
  l2Coverage: number,
  count = 12,
): Write[] {
  const rand = seededRandom(seed);
  const maxLen = Math.min(3 * cluster + 777, 256 * 1024);
  const w: Write[] = [];
  const add = (off: number, len: number) => {
    const o = Math.max(0, Math.min(off, size - 1));
    w.push({ off: o, len: Math.max(1, Math.min(len, size - o)), kind: 'data' });
  };
  add(0, Math.min(cluster + 100, 9000));
  add(size - Math.min(size, cluster + 300), cluster + 300);
  for (let b = l2Coverage; b < size && w.length < 6; b += l2Coverage) {
    add(b - 1000 - Math.floor(rand() * cluster), 2000 + cluster);
  }
  for (let i = 0; i < count; i++) add(Math.floor(rand() * size), 1 + Math.floor(rand() * maxLen));
  return w;
}

/** Runs the writes through qemu-io on `image`; data comes from per-write seeded random files in `dir`. */
export function applyWrites(
  dir: string,
  image: string,
  format: string,
  writes: Write[],
  seed: number,
  cwd?: string,
): void {
  const rand = seededRandom(seed);
  const cmds: string[] = [];
  writes.forEach((x, i) => {
    if (x.kind === 'data' || x.kind === 'compressed') {
      const f = join(dir, `w-${seed}-${i}.bin`);
      writeFileSync(f, randomBytes(rand, x.len));
      cmds.push('-c', `write ${x.kind === 'compressed' ? '-c ' : ''}-s ${f} ${x.off} ${x.len}`);
    } else if (x.kind === 'zero') cmds.push('-c', `write -z ${x.off} ${x.len}`);
    else if (x.kind === 'zero-unmap') cmds.push('-c', `write -z -u ${x.off} ${x.len}`);
    else cmds.push('-c', `discard ${x.off} ${x.len}`);
  });
  // qemu-io takes a bounded number of commands comfortably; chunk to stay well under ARG_MAX.
  for (let i = 0; i < cmds.length; i += 200) {
    const args = ['-f', format, ...cmds.slice(i, i + 200), image];
    if (cwd === undefined) qemuIo(...args);
    else runOk('qemu-io', args, { cwd });
  }
}

/** qemu-img create -f qcow2 with -o options; returns the path. */
export function createQcow2(
  path: string,
  size: number,
  opts: Record<string, string> = {},
  backing?: [string, string],
): string {
  const o = Object.entries(opts)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
  const args = ['create', '-q', '-f', 'qcow2'];
  if (o) args.push('-o', o);
  if (backing) args.push('-b', backing[0], '-F', backing[1]);
  args.push(path, String(size));
  qemuImg(...args);
  return path;
}

/** The guest-visible bytes of `image` as a raw file (the oracle). */
export function convertToRaw(image: string, out: string, cwd?: string): string {
  runOk('qemu-img', ['convert', '-O', 'raw', image, out], { cwd });
  return out;
}

export const K = 1024;
export const M = 1024 * 1024;
