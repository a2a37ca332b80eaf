/**
 * FUSE passthrough of raw exports against the plain image file, in the same
 * cache mode (docs/fuse-export.md, "Passthrough"): each workload runs with
 * fio on the plain file, on a raw export with passthrough and on the same
 * export with BLKEXPORT_FUSE_PASSTHROUGH=off (the fallback), interleaved row
 * by row (each export mounted for its run: two writable exports of one image
 * would conflict on its lock), buffered reads after a warming read, and
 * the report gives export / plain-file ratios. The exports are writable and
 * growable (what qualifies for passthrough writes); `blkexport mount` serves
 * them on a mountpoint file of their own.
 *
 *   node --import tsx bench/passthrough.ts [--size 1G] [--runtime 5] [--reps 1] [--dir /var/tmp]
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs, promisify } from 'node:util';
import { fioArgs, parseFioJson } from './fio.js';
import type { Workload } from './workloads.js';

const run = promisify(execFile);
const BIN = new URL('../bin/blkexport', import.meta.url).pathname;

const libaio = (depth: number): string[] => ['--ioengine=libaio', `--iodepth=${depth}`, '--direct=1'];
const row = (id: string, title: string, unit: 'MB/s' | 'IOPS', fio: string[]): Workload => ({
  id,
  title,
  image: 'allocated',
  format: 'raw',
  writes: fio.some((o) => /write|rw=randrw/.test(o)),
  unit,
  fio,
});
const ROWS: Workload[] = [
  row('seq-read-buffered', 'seq read 1 MiB, buffered', 'MB/s', [
    '--rw=read',
    '--bs=1M',
    '--ioengine=psync',
    '--direct=0',
  ]),
  row('seq-read-direct', 'seq read 1 MiB, O_DIRECT', 'MB/s', [
    '--rw=read',
    '--bs=1M',
    '--ioengine=psync',
    '--direct=1',
  ]),
  row('rand-read-qd16', 'rand read 4 KiB QD16, O_DIRECT', 'IOPS', [
    '--rw=randread',
    '--bs=4k',
    ...libaio(16),
  ]),
  row('seq-write-buffered', 'seq write 1 MiB, buffered', 'MB/s', [
    '--rw=write',
    '--bs=1M',
    '--ioengine=psync',
    '--direct=0',
    '--end_fsync=1',
  ]),
  row('rand-write-qd16', 'rand write 4 KiB QD16, O_DIRECT', 'IOPS', [
    '--rw=randwrite',
    '--bs=4k',
    ...libaio(16),
  ]),
  row('rand-rw-70-30', 'rand 70/30 read/write 4 KiB QD16, O_DIRECT', 'IOPS', [
    '--rw=randrw',
    '--rwmixread=70',
    '--bs=4k',
    ...libaio(16),
  ]),
];

type Target = 'plain' | 'passthrough' | 'fallback';
const TARGETS: Target[] = ['plain', 'passthrough', 'fallback'];

function sizeBytes(s: string): number {
  const m = /^(\d+)([KMG]?)$/i.exec(s);
  if (!m) throw new Error(`bad size '${s}'`);
  return Number(m[1]) * 1024 ** ' KMG'.indexOf((m[2] || ' ').toUpperCase());
}

async function fio(w: Workload, file: string, runtime: number): Promise<number> {
  const r = await run('fio', fioArgs(w, file, runtime), { maxBuffer: 64 << 20 });
  const f = parseFioJson(r.stdout);
  return w.unit === 'IOPS' ? f.readIops + f.writeIops : (f.readBw + f.writeBw) / 1e6;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '1G' },
      runtime: { type: 'string', default: '5' },
      reps: { type: 'string', default: '1' },
      dir: { type: 'string', default: '/var/tmp' },
    },
  });
  const runtime = Number(values.runtime);
  const dir = mkdtempSync(join(values.dir!, 'blkexport-ptbench-'));
  const image = join(dir, 'disk.raw');
  const mnt = join(dir, 'export');
  writeFileSync(mnt, '');
  // A fully written image (no holes), so every target reads allocated blocks.
  await run('dd', [
    'if=/dev/urandom',
    `of=${image}`,
    'bs=1M',
    `count=${sizeBytes(values.size!) >> 20}`,
    'status=none',
  ]);
  const results = new Map<string, number[]>();
  const mount = async (target: Target) => {
    if (target === 'plain') return image;
    const env = { ...process.env, BLKEXPORT_FUSE_PASSTHROUGH: target === 'fallback' ? 'off' : 'on' };
    await run(BIN, ['mount', image, mnt, '--format', 'raw', '--writable', '--growable', '--daemonize'], {
      env,
    });
    return mnt;
  };
  try {
    // Interleaved by row: a writing row (O_DIRECT above all) changes what the page cache holds for the next.
    for (let rep = 0; rep < Number(values.reps); rep++) {
      for (const w of ROWS) {
        for (const target of TARGETS) {
          const file = await mount(target);
          try {
            // Buffered reads against a warm page cache for every target (the target's own cache).
            if (w.fio.includes('--direct=0') && !w.writes) {
              await run('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', 'status=none']);
            }
            const v = await fio(w, file, runtime);
            const key = `${w.id}/${target}`;
            results.set(key, [...(results.get(key) ?? []), v]);
          } finally {
            if (target !== 'plain') await run(BIN, ['umount', mnt]);
          }
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const fmt = (x: number) => (x >= 100 ? x.toFixed(0) : x.toFixed(1));
  console.log('| workload | plain file | passthrough | fallback | passthrough / plain | fallback / plain |');
  console.log('|---|---|---|---|---|---|');
  for (const w of ROWS) {
    const [p, pt, fb] = TARGETS.map((t) => median(results.get(`${w.id}/${t}`)!));
    console.log(
      `| ${w.title} (${w.unit}) | ${fmt(p!)} | ${fmt(pt!)} | ${fmt(fb!)} | ${(pt! / p!).toFixed(2)}× | ${(fb! / p!).toFixed(2)}× |`,
    );
  }
}

await main();
