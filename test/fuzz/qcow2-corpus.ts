/**
 * The seed images the qcow2 fuzzer mutates, made by the real qemu-img/qemu-io
 * (small: 512 B to 64 KiB clusters, at most a few hundred KiB each) so that
 * every structure a guest-written image can carry is there to be broken:
 * v2 and v3 headers, many L2 tables and refcount blocks, zlib and zstd
 * compressed clusters, extended L2 with subclusters, zero clusters, internal
 * snapshots, bitmaps, a backing file with its format extension, an external
 * data file.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes, runOk, seededRandom } from '../helpers/tools.js';

export interface SeedImage {
  name: string;
  path: string;
}

const K = 1024;

function img(dir: string, name: string, size: number, opts: string, extra: string[] = []): string {
  const path = join(dir, `${name}.qcow2`);
  runOk(
    'qemu-img',
    ['create', '-q', '-f', 'qcow2', ...(opts ? ['-o', opts] : []), ...extra, path, String(size)],
    {
      cwd: dir,
    },
  );
  return path;
}

function io(dir: string, path: string, cmds: string[]): void {
  const args = ['-f', 'qcow2'];
  for (const c of cmds) args.push('-c', c);
  runOk('qemu-io', [...args, path], { cwd: dir });
}

/** Scattered writes of seeded data (`-c` compressed when asked), through qemu-io. */
function writes(
  dir: string,
  path: string,
  seed: number,
  size: number,
  n: number,
  len: number,
  how = '',
): void {
  const rand = seededRandom(seed);
  const data = join(dir, `data-${seed}.bin`);
  writeFileSync(data, randomBytes(rand, len));
  const cmds: string[] = [];
  for (let i = 0; i < n; i++) {
    const off = Math.floor((rand() * (size - len)) / len) * len;
    cmds.push(`write ${how} -s ${data} ${off} ${len}`.replace('  ', ' '));
  }
  io(dir, path, cmds);
}

/** Makes every seed image in `dir` (about a second with qemu-img 7.2); returns them. */
export function buildSeedCorpus(dir: string): SeedImage[] {
  const out: SeedImage[] = [];
  const add = (name: string, path: string) => out.push({ name, path });

  const v3 = img(dir, 'v3-64k', 4 << 20, '');
  writes(dir, v3, 1, 4 << 20, 4, 64 * K);
  io(dir, v3, ['write -z 1M 64k']);
  add('v3-64k', v3);

  const small = img(dir, 'v3-512', 1 << 20, 'cluster_size=512');
  writes(dir, small, 2, 1 << 20, 40, 1536);
  add('v3-512', small);

  const v2 = img(dir, 'v2-4k', 2 << 20, 'compat=0.10,cluster_size=4096');
  writes(dir, v2, 3, 2 << 20, 20, 4096);
  add('v2-4k', v2);

  const zlib = img(dir, 'zlib-4k', 1 << 20, 'cluster_size=4096');
  writes(dir, zlib, 4, 1 << 20, 12, 4096, '-c');
  add('zlib-4k', zlib);

  const zstd = img(dir, 'zstd-8k', 1 << 20, 'cluster_size=8192,compression_type=zstd');
  writes(dir, zstd, 5, 1 << 20, 8, 8192, '-c');
  add('zstd-8k', zstd);

  const ext = img(dir, 'extl2-16k', 2 << 20, 'cluster_size=16384,extended_l2=on');
  writes(dir, ext, 6, 2 << 20, 10, 1024);
  io(dir, ext, ['write -z 4096 2048', 'write -z -u 65536 16384']);
  add('extl2-16k', ext);

  const snap = img(dir, 'snapshots-4k', 1 << 20, 'cluster_size=4096');
  writes(dir, snap, 7, 1 << 20, 6, 4096);
  runOk('qemu-img', ['snapshot', '-c', 'one', snap], { cwd: dir });
  writes(dir, snap, 8, 1 << 20, 6, 4096);
  runOk('qemu-img', ['snapshot', '-c', 'two', snap], { cwd: dir });
  add('snapshots-4k', snap);

  const bitmaps = img(dir, 'bitmaps-4k', 1 << 20, 'cluster_size=4096');
  runOk('qemu-img', ['bitmap', '--add', bitmaps, 'b0'], { cwd: dir });
  writes(dir, bitmaps, 9, 1 << 20, 4, 4096);
  add('bitmaps-4k', bitmaps);

  const base = join(dir, 'base.raw');
  writeFileSync(base, randomBytes(seededRandom(10), 512 * K));
  const overlay = img(dir, 'backing-4k', 512 * K, 'cluster_size=4096', ['-b', 'base.raw', '-F', 'raw']);
  writes(dir, overlay, 11, 512 * K, 6, 4096);
  add('backing-4k', overlay);

  const data = img(dir, 'datafile-4k', 512 * K, 'cluster_size=4096,data_file=datafile.raw');
  writes(dir, data, 12, 512 * K, 6, 4096);
  add('datafile-4k', data);
  return out;
}
