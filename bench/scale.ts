import { mkdir, open, readFile, rm, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BlkError } from '../src/errors.js';
import { percentile, readyCount } from './agent.js';
import { mountsUnder, startBenchAgent } from './agent-process.js';
import type { Cleanup } from './cleanup.js';
import { isMounted, rssMiB, runCommand, waitUntil } from './proc.js';

const REPO = new URL('..', import.meta.url).pathname.replace(/\/$/, '');
const BIN = join(REPO, 'bin', 'blkexport');

/** Targets of the scale figures (issue 14). */
export const SCALE_TARGETS = {
  /** With 1000 exports. */
  reconcileP50Ms: 100,
  reconcileP99Ms: 1000,
  sigtermS: 5,
  /** With 5000 exports. */
  readyS: 20,
  rssMiB: 1536,
  /** validate of a 20000-export manifest. */
  validateS: 2,
};

export interface ScaleFigures {
  exports: number;
  readySeconds: number;
  rssMiB: number;
  edits: number;
  firstEditMs: number;
  /** The agent's own mean pass duration over the edits' passes (its metrics), ms. */
  passMeanMs: number;
  reconcileP50Ms: number;
  reconcileP99Ms: number;
  sigtermSeconds: number;
}

export type ScaleOutcome =
  | { exports: number; measured: true; figures: ScaleFigures }
  | { exports: number; measured: false; reason: string };

export interface ValidateFigure {
  exports: number;
  seconds: number;
  /** User + system CPU seconds of the validate process (less sensitive to a busy machine than `seconds`). */
  cpuSeconds: number;
}

export interface ScaleBenchOptions {
  dir: string;
  cleanup: Cleanup;
  exports: number;
  edits?: number;
  log?: (msg: string) => void;
}

function manifest(name: string, id: string, image: string, mountpoint: string): string {
  return [
    'apiVersion: blkexport/v1',
    'kind: ExportSet',
    'metadata:',
    `  name: ${name}`,
    'spec:',
    '  exports:',
    `    - id: ${id}`,
    `      image: ${image}`,
    '      format: qcow2',
    `      mountpoint: ${mountpoint}`,
    '      create-mountpoint: true',
    '',
  ].join('\n');
}

/**
 * True when the first 512 bytes of `path` read back. Read here: this process
 * does not serve the export (a `head` child per try put its own start-up,
 * tens of milliseconds on a busy machine, into every edit's figure).
 */
async function readsBack(path: string): Promise<boolean> {
  const fh = await open(path, 'r').catch(() => undefined);
  if (!fh) return false;
  try {
    return (await fh.read(Buffer.alloc(512), 0, 512, 0)).bytesRead === 512;
  } catch {
    return false;
  } finally {
    await fh.close();
  }
}

/** Sum (seconds) and count of the agent's reconcile pass durations, from GET /metrics. */
function passTotals(socket: string): Promise<{ sum: number; count: number }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: socket, path: '/metrics', timeout: 60_000 }, (res) => {
      let body = '';
      res.on('data', (d) => {
        body += d;
      });
      res.on('end', () => {
        const num = (name: string) =>
          Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(body)?.[1] ?? Number.NaN);
        resolve({
          sum: num('blkexport_reconcile_duration_seconds_sum'),
          count: num('blkexport_reconcile_duration_seconds_count'),
        });
      });
    });
    req.on('error', reject);
    req.end();
  });
}

/** One small qcow2 made by qemu-img, copied to `n` distinct files (4 KiB clusters keep them ~20 KiB). */
async function makeImages(images: string, n: number): Promise<void> {
  const first = join(images, 'img0.qcow2');
  const r = await runCommand(
    'qemu-img',
    ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', first, '1M'],
    { timeoutMs: 60_000 },
  );
  if (r.status !== 0) throw new BlkError('IO', `qemu-img create: ${r.stderr}`);
  const bytes = await readFile(first);
  for (let i = 1; i <= n; i++) await writeFile(join(images, `img${i}.qcow2`), bytes);
}

/** The agent figures with `opts.exports` distinct images; everything it starts is undone through opts.cleanup. */
export async function measureScale(opts: ScaleBenchOptions): Promise<ScaleOutcome> {
  const n = opts.exports;
  const edits = opts.edits ?? 30;
  const log = opts.log ?? (() => undefined);
  const root = join(opts.dir, `scale-${n}`);
  const images = join(root, 'images');
  const mnt = join(root, 'mnt');
  const manifests = join(root, 'manifests');
  for (const d of [images, mnt, manifests]) await mkdir(d, { recursive: true });
  opts.cleanup.add(`scale ${n} files`, () => rm(root, { recursive: true, force: true }));

  log(`scale ${n}: making ${n + 1} qcow2 images`);
  await makeImages(images, n); // img0 … img(n-1) exported, img(n) for the edits
  for (let i = 0; i < n; i++) {
    const id = `e${String(i).padStart(5, '0')}`;
    await writeFile(
      join(manifests, `${id}.yaml`),
      manifest(id, id, join(images, `img${i}.qcow2`), join(mnt, `${id}.raw`)),
    );
  }

  const t0 = performance.now();
  const {
    proc: agent,
    socket,
    stderr,
    exited,
    stop,
  } = startBenchAgent({
    root,
    manifests,
    allowRoot: root,
    cleanup: opts.cleanup,
    label: `scale ${n} agent`,
    args: ['--max-exports', String(n + 10)],
    stopTimeoutMs: 120_000,
  });
  try {
    await waitUntil(
      async () => {
        if (agent.exitCode !== null) throw new BlkError('AGENT', `agent exited: ${stderr()}`);
        return (await readyCount(socket, 60_000)) === n;
      },
      600_000,
      `${n} exports ready`,
      // GET /status answers with every export: asked 20 times a second it took a share of the agent it measures.
      250,
    );
    const readySeconds = (performance.now() - t0) / 1000;
    const rss = await rssMiB(agent.pid!);
    log(`scale ${n}: ready in ${readySeconds.toFixed(2)} s, RSS ${rss.toFixed(0)} MiB`);

    // Edits: a new manifest (one export of a distinct image) saved → readable here; removed → unmounted.
    const editFile = join(manifests, 'zz-edit.yaml');
    const editMnt = join(mnt, 'edit.raw');
    const editImg = join(images, `img${n}.qcow2`);
    const lat: number[] = [];
    const passesBefore = await passTotals(socket);
    for (let i = 0; i < edits; i++) {
      const start = performance.now();
      await writeFile(editFile, manifest('zz-edit', `edit${i}`, editImg, editMnt));
      for (;;) {
        if ((await isMounted(editMnt)) && (await readsBack(editMnt))) break;
        if (performance.now() - start > 120_000)
          throw new BlkError('AGENT', `edit ${i} not readable within 120 s: ${stderr().slice(-1500)}`);
        await sleep(5);
      }
      lat.push(performance.now() - start);
      await rm(editFile);
      await waitUntil(async () => !(await isMounted(editMnt)), 120_000, `edit ${i} removed`);
    }
    const passesAfter = await passTotals(socket);
    const passMeanMs =
      (1000 * (passesAfter.sum - passesBefore.sum)) / Math.max(1, passesAfter.count - passesBefore.count);
    const firstEditMs = lat[0]!;
    const sorted = [...lat].sort((a, b) => a - b);
    const figures: Omit<ScaleFigures, 'sigtermSeconds'> = {
      exports: n,
      readySeconds,
      rssMiB: rss,
      edits,
      firstEditMs,
      passMeanMs,
      reconcileP50Ms: percentile(sorted, 50),
      reconcileP99Ms: percentile(sorted, 99),
    };
    log(
      `scale ${n}: first edit ${firstEditMs.toFixed(0)} ms; agent pass mean ${passMeanMs.toFixed(1)} ms; ${edits} edits p50 ${figures.reconcileP50Ms.toFixed(0)} ms, p99 ${figures.reconcileP99Ms.toFixed(0)} ms`,
    );

    // SIGTERM: flush and unmount everything, then exit.
    const s0 = performance.now();
    agent.kill('SIGTERM');
    await Promise.race([exited, sleep(300_000)]);
    const sigtermSeconds = (performance.now() - s0) / 1000;
    if (agent.exitCode !== 0)
      throw new BlkError('AGENT', `agent exit ${agent.exitCode}: ${stderr().slice(-1500)}`);
    const left = await mountsUnder(root);
    if (left.length) throw new BlkError('AGENT', `${left.length} mounts left after SIGTERM`);
    log(`scale ${n}: SIGTERM → exit, all unmounted, in ${sigtermSeconds.toFixed(2)} s`);
    return { exports: n, measured: true, figures: { ...figures, sigtermSeconds } };
  } finally {
    await stop();
  }
}

/** `blkexport validate` of one manifest file with `exports` shorthand exports. */
export async function measureValidate(
  dir: string,
  exports: number,
  cleanup: Cleanup,
): Promise<ValidateFigure> {
  const file = join(dir, `validate-${exports}.yaml`);
  cleanup.add(`validate ${exports} manifest`, () => rm(file, { force: true }));
  const lines = [
    'apiVersion: blkexport/v1',
    'kind: ExportSet',
    'metadata:',
    '  name: big',
    'spec:',
    '  exports:',
  ];
  for (let i = 0; i < exports; i++)
    lines.push(
      `    - id: e${i}`,
      `      image: ${dir}/img${i}.qcow2`,
      '      format: qcow2',
      `      mountpoint: ${dir}/m${i}.raw`,
    );
  await writeFile(file, `${lines.join('\n')}\n`);
  // GNU time (Debian `time`) gives the child's CPU time next to the wall time.
  const r = await runCommand('/usr/bin/time', ['-f', 'TIMES %e %U %S', BIN, 'validate', file], {
    timeoutMs: 600_000,
  });
  if (r.status !== 0) throw new BlkError('AGENT', `validate failed: ${r.stderr || r.stdout}`);
  const m = /TIMES (\S+) (\S+) (\S+)/.exec(r.stderr);
  if (!m) throw new BlkError('AGENT', `no times from /usr/bin/time: ${r.stderr.slice(-500)}`);
  return { exports, seconds: Number(m[1]), cpuSeconds: Number(m[2]) + Number(m[3]) };
}

/** The report's "Agent at scale" section. */
export function renderScaleSection(outcomes: ScaleOutcome[], validate: ValidateFigure | string): string {
  const t = SCALE_TARGETS;
  const ok = (good: boolean) => (good ? 'met' : '**missed**');
  const lines = [
    '## Agent at scale',
    '',
    'Distinct qcow2 images, one manifest file each; edits add a manifest (saved → readable) and remove it.',
    '',
    '| exports | ready | RSS | first edit | edit p50 / p99 | agent pass (mean) | SIGTERM → exit | targets |',
    '|---|---|---|---|---|---|---|---|',
  ];
  for (const o of outcomes) {
    if (!o.measured) {
      lines.push(`| ${o.exports} | n/a — ${o.reason} | | | | | | |`);
      continue;
    }
    const f = o.figures;
    const notes: string[] = [];
    if (f.exports <= 1000)
      notes.push(
        `p50 ≤ ${t.reconcileP50Ms} ms ${ok(f.reconcileP50Ms <= t.reconcileP50Ms)}`,
        `p99 ≤ ${t.reconcileP99Ms} ms ${ok(f.reconcileP99Ms <= t.reconcileP99Ms && f.firstEditMs <= t.reconcileP99Ms)}`,
        `SIGTERM ≤ ${t.sigtermS} s ${ok(f.sigtermSeconds <= t.sigtermS)}`,
      );
    if (f.exports >= 5000)
      notes.push(
        `ready ≤ ${t.readyS} s ${ok(f.readySeconds <= t.readyS)}`,
        `RSS ≤ ${t.rssMiB} MiB ${ok(f.rssMiB <= t.rssMiB)}`,
      );
    lines.push(
      `| ${f.exports} | ${f.readySeconds.toFixed(2)} s | ${f.rssMiB.toFixed(0)} MiB | ${f.firstEditMs.toFixed(0)} ms | ${f.reconcileP50Ms.toFixed(0)} / ${f.reconcileP99Ms.toFixed(0)} ms (${f.edits} edits) | ${f.passMeanMs.toFixed(1)} ms | ${f.sigtermSeconds.toFixed(2)} s | ${notes.join('; ')} |`,
    );
  }
  lines.push('');
  if (typeof validate === 'string') lines.push(`\`blkexport validate\`: n/a — ${validate}.`, '');
  else
    lines.push(
      `\`blkexport validate\` of one manifest with ${validate.exports} shorthand exports: ${validate.seconds.toFixed(2)} s, ${validate.cpuSeconds.toFixed(2)} CPU-seconds (target ≤ ${t.validateS} s: ${ok(validate.seconds <= t.validateS)}).`,
      '',
    );
  return lines.join('\n');
}
