/**
 * The cost of the shared-cluster scan (src/block/format/qcow2/shared.ts) that
 * runs when a qcow2 is opened writable, on a 1 TiB sparse image and a 100 GiB
 * image with every L2 entry allocated (`qemu-img create -o
 * preallocation=metadata`: metadata written, data a hole in a sparse file),
 * next to `qemu-img check` (which walks the same references) on the same image.
 * Each image is measured in child processes of its own, so peak RSS is the
 * open's alone.
 *
 *   node --import tsx bench/shared-scan.ts [--dir DIR] [--reps N (3)]
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const REPO = new URL('..', import.meta.url).pathname.replace(/\/$/, '');

/** In a child: opens `path` read-only or writable (the scan) and prints {ms, rssKiB}. */
const CHILD = `
import { openImage } from ${JSON.stringify(`${REPO}/src/block/index.js`)};
import { stateOf } from ${JSON.stringify(`${REPO}/src/block/format/qcow2/inspect.js`)};
import { scanShared } from ${JSON.stringify(`${REPO}/src/block/format/qcow2/shared.js`)};
const [path, mode] = process.argv.slice(-2);
const t0 = performance.now();
const img = await openImage({ filename: path, readOnly: mode === 'read-only', format: 'qcow2', locking: 'off' });
const openMs = performance.now() - t0;
let scanMs = 0;
let shared = 0;
if (mode === 'scan-again') {
  const t1 = performance.now();
  shared = (await scanShared(stateOf(img.node))).size;
  scanMs = performance.now() - t1;
}
await img.close();
console.log(JSON.stringify({ openMs, scanMs, shared, rssKiB: process.resourceUsage().maxRSS }));
`;

function child(
  path: string,
  mode: string,
): { openMs: number; scanMs: number; shared: number; rssKiB: number } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', CHILD, path, mode], {
    cwd: REPO,
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout.trim().split('\n').pop()!);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

const { values } = parseArgs({
  options: { dir: { type: 'string' }, reps: { type: 'string', default: '3' } },
});
const reps = Number(values.reps);
const dir = mkdtempSync(join(values.dir ?? tmpdir(), 'blkexport-scan-'));
try {
  const images: [string, string[]][] = [
    ['1 TiB sparse (64 KiB clusters)', ['-f', 'qcow2', join(dir, 'sparse.qcow2'), '1T']],
    [
      '100 GiB, every L2 entry allocated (preallocation=metadata)',
      ['-f', 'qcow2', '-o', 'preallocation=metadata', join(dir, 'full.qcow2'), '100G'],
    ],
  ];
  console.log(
    '| image | file (apparent / on disk) | open read-only | open writable (with scan) | scan alone | peak RSS read-only / writable | qemu-img check |',
  );
  console.log('|---|---|---|---|---|---|---|');
  for (const [what, args] of images) {
    execFileSync('qemu-img', ['create', '-q', ...args]);
    const path = args[args.length - 2]!;
    const st = statSync(path);
    const ro = Array.from({ length: reps }, () => child(path, 'read-only'));
    const rw = Array.from({ length: reps }, () => child(path, 'read-write'));
    const again = Array.from({ length: reps }, () => child(path, 'scan-again'));
    const check = Array.from({ length: reps }, () => {
      const t0 = performance.now();
      execFileSync('qemu-img', ['check', '-q', path]);
      return performance.now() - t0;
    });
    if (again.some((x) => x.shared !== 0)) throw new Error(`${what}: the scan found shared clusters`);
    const ms = (x: number) => `${Math.round(x)} ms`;
    console.log(
      `| ${what} | ${(st.size / 2 ** 30).toFixed(0)} GiB / ${((st.blocks * 512) / 2 ** 20).toFixed(1)} MiB ` +
        `| ${ms(median(ro.map((x) => x.openMs)))} | ${ms(median(rw.map((x) => x.openMs)))} ` +
        `| ${ms(median(again.map((x) => x.scanMs)))} ` +
        `| ${Math.round(median(ro.map((x) => x.rssKiB)) / 1024)} / ${Math.round(median(rw.map((x) => x.rssKiB)) / 1024)} MiB ` +
        `| ${ms(median(check))} |`,
    );
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
