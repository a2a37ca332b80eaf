/**
 * `npm run bench`: fio through qemu-storage-daemon's FUSE export, through
 * blkexport's, and on the plain raw file, on identical images, interleaved and
 * repeated; writes a Markdown report to bench/results/ and prints it.
 *
 *   npm run bench                     1 GiB images, 3 × 10 s per server and workload
 *   npm run bench -- --quick          256 MiB, 1 × 2 s (checks the harness, not for quoting)
 *   npm run bench -- --only rand-read --servers qsd,plain --size 512M --runtime 5 --reps 3
 * Environment: BENCH_SIZE, BENCH_RUNTIME, BENCH_REPS, BENCH_DIR (where images go; default the OS temp dir).
 */
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, statfs, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { BlkError, describeError } from '../src/errors.js';
import { type AgentOutcome, measureAgent } from './agent.js';
import { Cleanup, cleanUpOnSignals } from './cleanup.js';
import { headline, runFio } from './fio.js';
import {
  type BenchImages,
  formatImageDir,
  type ImagePair,
  makeFormatImage,
  makeFreshPair,
  makeImages,
  removePair,
} from './images.js';
import { describeMachine } from './machine.js';
import { NBD_ROWS, type NbdOutcome, runNbdRows, selectNbdRows } from './nbd.js';
import { cpuSeconds, mountPoints, runCommand, unmountIfMounted } from './proc.js';
import { type Cell, type RowResult, renderReport, SAME_AS_PLAIN } from './report.js';
import { runScale } from './scale-run.js';
import { makeServers, SERVER_IDS, type Server, type ServerId } from './servers.js';
import { FORMAT_WORKLOADS, type FormatVariant, isDirect, WORKLOADS, type Workload } from './workloads.js';

const REPO = new URL('..', import.meta.url).pathname.replace(/\/$/, '');
const MiB = 2 ** 20;

interface Options {
  size: number;
  runtimeS: number;
  reps: number;
  quick: boolean;
  only: string[];
  servers: ServerId[];
  baseDir: string;
  outDir: string;
  /** run: fio rows then the agent figures; skip: fio only; only: the agent figures only; scale: the scale figures only. */
  agent: 'run' | 'skip' | 'only' | 'scale';
  /** Export counts of the agent scale figures (empty: none). */
  agentScale: number[];
}

const USAGE = `usage: npm run bench -- [--quick] [--size SIZE] [--runtime SEC] [--reps N]
                        [--only ID[,ID...]] [--servers qsd,blkexport,plain,plain-cached] [--dir DIR] [--out DIR]
  --quick      256 MiB images, 1 repetition of 2 s (a check of the harness, not figures to quote)
  --size       image size, e.g. 1G (default; env BENCH_SIZE), 256M
  --runtime    seconds per fio run (default 10; env BENCH_RUNTIME)
  --reps       repetitions per server and workload (default 3; env BENCH_REPS)
  --only       workloads with these ids, or whose id contains one of these strings (ids: ${WORKLOADS.map((w) => w.id).join(', ')})
               format rows, only when asked for (items starting with fmt: 'fmt' is all of them; ids:
               fmt-VARIANT-seq-read, fmt-VARIANT-rand-read-qd16, VARIANT one of ${[...new Set(FORMAT_WORKLOADS.map((w) => w.variant!.name))].join(', ')})
               NBD rows (in every run with I/O rows; 'nbd' alone is all of them; ids: ${NBD_ROWS.map((r) => r.id).join(', ')})
  --servers    which columns to measure (default all: ${SERVER_IDS.join(',')})
  --dir        where the temporary images and mountpoints go (default: env BENCH_DIR, else the OS temp dir)
  --out        where the report goes (default bench/results)
  --agent      run (default): also the agent figures (200 exports ready, RSS, reconcile latency, CPU/GiB);
               skip: fio rows only; only: the agent figures only; scale: the agent scale figures only
  --agent-scale  export counts of the agent scale figures (distinct images; default 1000,5000; none to omit;
               with --quick default none); each also measures validate of a 20000-export manifest once`;

function agentMode(v: string): Options['agent'] {
  if (v === 'run' || v === 'skip' || v === 'only' || v === 'scale') return v;
  throw new BlkError('USAGE', `--agent takes run, skip, only or scale, not '${v}'`);
}

/** Parses 512, 64K, 256M, 1G (binary suffixes). */
function parseSize(s: string): number {
  const m = /^(\d+)([KMGT]?)i?B?$/i.exec(s.trim());
  if (!m) throw new BlkError('USAGE', `not a size: '${s}' (e.g. 256M, 1G)`);
  const mult = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[
    m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'
  ];
  return Number(m[1]) * mult;
}

function positiveInt(s: string, what: string): number {
  const n = Number(s);
  if (!Number.isSafeInteger(n) || n < 1)
    throw new BlkError('USAGE', `${what} must be a positive integer, not '${s}'`);
  return n;
}

function parseOptions(argv: string[]): Options | undefined {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      size: { type: 'string' },
      runtime: { type: 'string' },
      reps: { type: 'string' },
      only: { type: 'string' },
      servers: { type: 'string' },
      dir: { type: 'string' },
      out: { type: 'string' },
      agent: { type: 'string', default: 'run' },
      'agent-scale': { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(USAGE);
    return undefined;
  }
  const quick = values.quick === true;
  const size = parseSize(values.size ?? process.env.BENCH_SIZE ?? (quick ? '256M' : '1G'));
  if (size < 64 * MiB || size % MiB !== 0)
    throw new BlkError('USAGE', 'the image size must be a multiple of 1 MiB, at least 64 MiB');
  const servers = (values.servers ?? SERVER_IDS.join(',')).split(',').map((s) => s.trim());
  for (const s of servers) {
    if (!(SERVER_IDS as readonly string[]).includes(s))
      throw new BlkError('USAGE', `unknown server '${s}' (${SERVER_IDS.join(', ')})`);
  }
  return {
    size,
    runtimeS: positiveInt(values.runtime ?? process.env.BENCH_RUNTIME ?? (quick ? '2' : '10'), '--runtime'),
    reps: positiveInt(values.reps ?? process.env.BENCH_REPS ?? (quick ? '1' : '3'), '--reps'),
    quick,
    only: values.only
      ? values.only
          .split(',')
          .map((s) => s.trim())
          .filter(Boolean)
      : [],
    servers: servers as ServerId[],
    baseDir: values.dir ?? process.env.BENCH_DIR ?? tmpdir(),
    outDir: values.out ?? join(REPO, 'bench', 'results'),
    agent: agentMode(values.agent as string),
    agentScale:
      (values['agent-scale'] ?? (quick ? 'none' : '1000,5000')) === 'none'
        ? []
        : (values['agent-scale'] ?? '1000,5000')
            .split(',')
            .map((s) => positiveInt(s.trim(), '--agent-scale')),
  };
}

function log(msg: string): void {
  process.stderr.write(`bench: ${msg}\n`);
}

async function preflight(opts: Options): Promise<void> {
  for (const tool of ['fio', 'qemu-img', 'qemu-storage-daemon', 'umount']) {
    const r = await runCommand('sh', ['-c', `command -v ${tool}`], { timeoutMs: 10_000 });
    if (r.status !== 0)
      throw new BlkError(
        'USAGE',
        `${tool} is required (Debian: fio, qemu-utils, qemu-system-common or qemu-storage-daemon)`,
      );
  }
  if (!existsSync('/dev/fuse'))
    throw new BlkError('USAGE', '/dev/fuse is missing: FUSE exports cannot run here');
  const fs = await statfs(opts.baseDir);
  const need = 8 * opts.size;
  if (fs.bavail * fs.bsize < need) {
    throw new BlkError(
      'USAGE',
      `${opts.baseDir} has ${Math.floor((fs.bavail * fs.bsize) / MiB)} MiB free; the run needs about ${need / MiB} MiB (try --size or --dir)`,
    );
  }
}

/** Unmounts anything left under `dir`, then removes it (retrying while a lazily detached mount lets go). */
async function removeWorkDir(dir: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    for (const mp of await mountPoints()) if (mp.startsWith(`${dir}/`)) await unmountIfMounted(mp);
    try {
      await rm(dir, { recursive: true, force: true });
      return;
    } catch (e) {
      if (attempt >= 10) throw e;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

/**
 * The format row image made last: made when a row first needs it, and
 * removed when a row needs another variant's (a variant's rows run one
 * after another), so a run holds one converted image at a time.
 */
let converted: { variant: FormatVariant; image: Promise<string> } | undefined;

async function pairFor(images: BenchImages, w: Workload, dir: string): Promise<ImagePair | undefined> {
  if (w.image === 'fresh') return undefined;
  const pair = images[w.image];
  const v = w.variant;
  if (v === undefined) return pair;
  if (converted?.variant !== v) {
    if (converted) {
      await converted.image.catch(() => undefined);
      await rm(formatImageDir(dir, converted.variant), { recursive: true, force: true });
    }
    converted = { variant: v, image: makeFormatImage(dir, pair.raw, v, log) };
  }
  return { ...pair, converted: await converted.image };
}

/** Workloads an --only item selects: items starting with `fmt` choose among the (opt-in) format rows. */
function selected(only: readonly string[]): Workload[] {
  if (!only.length) return [...WORKLOADS];
  // An item selects the workload with exactly that id, else every workload whose id contains it.
  const selects = (o: string, w: Workload, all: readonly Workload[]): boolean =>
    all.some((x) => x.id === o) ? w.id === o : w.id.includes(o);
  const pick = (all: readonly Workload[], items: string[]) =>
    all.filter((w) => items.some((o) => selects(o, w, all)));
  return [
    ...pick(
      WORKLOADS,
      only.filter((o) => !o.startsWith('fmt')),
    ),
    ...pick(
      FORMAT_WORKLOADS,
      only.filter((o) => o.startsWith('fmt')),
    ),
  ];
}

/** One server, one workload, one repetition: serve, run fio, stop. Returns the headline figure. */
async function measureOnce(
  server: Server,
  w: Workload,
  images: BenchImages,
  dir: string,
  opts: Options,
  cell: Cell,
): Promise<void> {
  const pair = (await pairFor(images, w, dir)) ?? (await makeFreshPair(dir, opts.size));
  try {
    const exported = await server.serve(pair, { writable: w.writes, size: opts.size, format: w.format });
    try {
      const cpu0 = exported.pid ? await cpuSeconds(exported.pid) : undefined;
      const r = await runFio(w, exported.path, opts.runtimeS, exported.buffered);
      if (exported.pid && cpu0 !== undefined && r.bytes > 0)
        cell.cpu.push(((await cpuSeconds(exported.pid)) - cpu0) / (r.bytes / 2 ** 30));
      cell.values.push(headline(w, r));
      cell.raw.push(r);
      if (exported.passthrough) cell.passthrough = true;
    } finally {
      await exported.stop();
    }
  } finally {
    if (w.image === 'fresh') await removePair(pair);
  }
}

async function main(argv: string[]): Promise<number> {
  const opts = parseOptions(argv);
  if (!opts) return 0;
  const workloads = opts.agent === 'only' || opts.agent === 'scale' ? [] : selected(opts.only);
  const nbdRows =
    opts.agent === 'only' || opts.agent === 'scale'
      ? []
      : selectNbdRows(
          opts.only,
          [...WORKLOADS, ...FORMAT_WORKLOADS].map((w) => w.id),
        );
  if (!workloads.length && !nbdRows.length && opts.agent !== 'only' && opts.agent !== 'scale')
    throw new BlkError(
      'USAGE',
      `--only matches no workload (${[...WORKLOADS, ...FORMAT_WORKLOADS].map((w) => w.id).join(', ')}, ${NBD_ROWS.map((r) => r.id).join(', ')})`,
    );
  await preflight(opts);

  const cleanup = new Cleanup();
  cleanUpOnSignals(cleanup);
  const started = new Date();
  try {
    const dir = await mkdtemp(join(opts.baseDir, 'blkexport-bench-'));
    cleanup.add(`work directory ${dir}`, () => removeWorkDir(dir));
    const machine = await describeMachine(REPO);
    const servers = makeServers({ dir, cleanup, repo: REPO }).filter((s) => opts.servers.includes(s.id));
    // The host-cached plain file runs only on O_DIRECT rows (a buffered row's plain column is that already).
    const runs = workloads.reduce(
      (n, w) => n + opts.reps * servers.filter((s) => s.id !== 'plain-cached' || isDirect(w)).length,
      0,
    );
    log(
      `${workloads.length} workloads, ${nbdRows.length} NBD rows, ${runs} fio runs of ≤ ${opts.runtimeS} s ≈ ${Math.ceil((runs * (opts.runtimeS + 2)) / 60)} min, images in ${dir}`,
    );
    const images = workloads.length || nbdRows.length ? await makeImages(dir, opts.size, log) : undefined;

    const rows: RowResult[] = [];
    let done = 0;
    for (const w of workloads) {
      const cells = Object.fromEntries(
        SERVER_IDS.map((id) => [id, { values: [], raw: [], cpu: [] } as Cell]),
      ) as Record<ServerId, Cell>;
      for (const id of SERVER_IDS)
        if (!opts.servers.includes(id)) cells[id].failure = 'not measured in this run (--servers)';
      // Buffered rows already have their same-cache-mode baseline: the plain column.
      if (!isDirect(w)) cells['plain-cached'].failure = SAME_AS_PLAIN;
      for (let rep = 0; rep < opts.reps; rep++) {
        // Rotate the order each repetition so that no server always runs first (page cache, thermal state).
        const order = servers.map((_, i) => servers[(i + rep) % servers.length]!);
        for (const server of order) {
          if (cleanup.aborting) throw new BlkError('AGENT', 'interrupted');
          const cell = cells[server.id];
          if (cell.failure) continue; // it failed on an earlier repetition: the reason is recorded once
          done++;
          try {
            await measureOnce(server, w, images!, dir, opts, cell);
            log(
              `[${done}/${runs}] ${w.id} ${server.id} rep ${rep + 1}: ${cell.values.at(-1)!.toFixed(1)} ${w.unit}`,
            );
          } catch (e) {
            cell.failure = describeError(e).replaceAll(dir, '$TMP');
            log(`[${done}/${runs}] ${w.id} ${server.id} rep ${rep + 1}: n/a: ${cell.failure}`);
          }
        }
      }
      rows.push({ workload: w, cells });
    }
    // The NBD rows (bench/nbd.ts): their own servers and section of the report.
    const nbd: NbdOutcome | undefined = nbdRows.length
      ? await runNbdRows(nbdRows, images!, { dir, cleanup, repo: REPO, log, ...opts })
      : undefined;

    let agent: AgentOutcome = { measured: false, reason: 'skipped (--agent skip)' };
    if (opts.agent === 'run' || opts.agent === 'only') {
      try {
        agent = await measureAgent({
          dir,
          cleanup,
          log,
          ...(opts.quick ? { exports: 20, edits: 10, readBytes: 64 * MiB } : {}),
        });
      } catch (e) {
        agent = { measured: false, reason: `failed: ${describeError(e).replaceAll(dir, '$TMP')}` };
        log(`agent figures: ${agent.reason}`);
      }
    }
    const meta = {
      started,
      finished: new Date(),
      command: `npm run bench${argv.length ? ` -- ${argv.join(' ')}` : ''}`,
      sizeBytes: opts.size,
      runtimeS: opts.runtimeS,
      reps: opts.reps,
      quick: opts.quick,
      machine,
    };
    const scale = opts.agent === 'skip' ? undefined : await runScale(opts.agentScale, dir, cleanup, log);
    const report = renderReport(meta, rows, agent) + (nbd ? `\n${nbd.section}` : '') + (scale?.section ?? '');
    await mkdir(opts.outDir, { recursive: true });
    const stamp = started.toISOString().slice(0, 16).replace(':', '').replace('T', '-');
    const base = join(opts.outDir, `${stamp}${opts.quick ? '-quick' : ''}`);
    await writeFile(`${base}.md`, report);
    await writeFile(
      `${base}.json`,
      `${JSON.stringify({ meta, rows: rows.map((r) => ({ workload: r.workload.id, cells: r.cells })), agent, nbd: nbd?.rows.map((r) => ({ workload: r.row.id, cells: r.cells })), scale: scale?.json }, null, 2)}\n`,
    );
    console.log(report);
    log(`report written to ${base}.md (raw fio figures in ${base}.json)`);
    // QSD and the plain file are the reference: if they fail, the harness (or the machine) is broken.
    const broken = rows.filter((r) =>
      (['qsd', 'plain', 'plain-cached'] as const).some(
        (id) => opts.servers.includes(id) && r.cells[id].failure && r.cells[id].failure !== SAME_AS_PLAIN,
      ),
    );
    const brokenIds = [...broken.map((r) => r.workload.id), ...(nbd?.referenceFailures ?? [])];
    if (brokenIds.length) {
      log(`reference columns failed on: ${brokenIds.join(', ')}`);
      return 1;
    }
    return 0;
  } finally {
    await cleanup.runAll();
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    log(describeError(e));
    process.exitCode = 1;
  },
);
