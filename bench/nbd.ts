/**
 * The NBD rows of the benchmark (docs/benchmarks.md, "The NBD rows"): the
 * same qcow2 image served over a Unix socket by qemu-storage-daemon's NBD
 * export, by qemu-nbd and by `blkexport nbd`, read by nbdcopy and by fio's
 * `nbd` ioengine (libnbd), servers interleaved and repeated like the FUSE rows.
 * Every server opens the image through the host page cache (QEMU's default
 * `cache.direct=off` / qemu-nbd's default `--cache=writeback`, and blkexport,
 * which never uses O_DIRECT).
 */
import { existsSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BlkError, describeError } from '../src/errors.js';
import type { Cleanup } from './cleanup.js';
import { type FioResult, parseFioJson } from './fio.js';
import type { BenchImages } from './images.js';
import { cpuSeconds, runCommand, startServer, waitExit } from './proc.js';
import { type Cell, summarize } from './report.js';
import type { Unit } from './workloads.js';

export interface NbdRow {
  /** Short id for --only and the JSON results. */
  id: string;
  title: string;
  unit: Unit;
  /** Which image of the run: the pristine allocated pair, or the copy that write rows may change. */
  image: 'allocated' | 'overwrite';
  writes: boolean;
  /** nbdcopy of the whole export to `null:`, or a fio job with these options (engine and target added). */
  fio?: string[];
}

export const NBD_ROWS: readonly NbdRow[] = [
  {
    id: 'nbd-copy',
    title: 'NBD: nbdcopy whole image → null:',
    unit: 'MB/s',
    image: 'allocated',
    writes: false,
  },
  {
    id: 'nbd-rand-read',
    title: 'NBD: fio rand read 4 KiB, QD16',
    unit: 'IOPS',
    image: 'allocated',
    writes: false,
    fio: ['--rw=randread', '--bs=4k', '--iodepth=16'],
  },
  {
    id: 'nbd-rand-write',
    title: 'NBD: fio rand write 4 KiB, QD16',
    unit: 'IOPS',
    image: 'overwrite',
    writes: true,
    fio: ['--rw=randwrite', '--bs=4k', '--iodepth=16'],
  },
];

export const NBD_SERVER_IDS = ['qsd', 'qemu-nbd', 'blkexport'] as const;
export type NbdServerId = (typeof NBD_SERVER_IDS)[number];

/**
 * The NBD rows an --only list selects: an item equal to any row id of the run
 * (FUSE or NBD: `otherIds`) selects exactly that row; any other item selects
 * every NBD row whose id contains it. No items: every NBD row.
 */
export function selectNbdRows(only: string[], otherIds: readonly string[]): NbdRow[] {
  if (!only.length) return [...NBD_ROWS];
  const exact = new Set([...otherIds, ...NBD_ROWS.map((r) => r.id)]);
  return NBD_ROWS.filter((r) => only.some((o) => (exact.has(o) ? r.id === o : r.id.includes(o))));
}

const EXPORT_NAME = 'bench';

interface Served {
  uri: string;
  pid: number | undefined;
  stop(): Promise<void>;
}

interface NbdServer {
  id: NbdServerId;
  serve(image: string, writable: boolean): Promise<Served>;
}

export interface NbdContext {
  dir: string;
  cleanup: Cleanup;
  repo: string;
  size: number;
  runtimeS: number;
  reps: number;
  log: (msg: string) => void;
}

function uriFor(sock: string): string {
  return `nbd+unix:///${EXPORT_NAME}?socket=${sock}`;
}

function lastLines(text: string): string {
  return text.trim().split('\n').slice(-2).join(' / ').slice(0, 240) || 'no message';
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Ends `pid` with SIGTERM (the clean shutdown of all three servers), SIGKILL after 30 s. */
async function terminate(pid: number): Promise<void> {
  if (!alive(pid)) return;
  process.kill(pid, 'SIGTERM');
  for (let i = 0; i < 300 && alive(pid); i++) await sleep(100);
  if (alive(pid)) {
    process.stderr.write(`bench: NBD server pid ${pid} ignored SIGTERM for 30 s; killing it\n`);
    process.kill(pid, 'SIGKILL');
  }
}

/** Polls with nbdinfo until the export answers (the server may listen before its export exists). */
async function waitServing(uri: string, exited: () => string | undefined): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const gone = exited();
    if (gone !== undefined) throw new BlkError('IO', gone);
    const r = await runCommand('nbdinfo', ['--size', uri], { timeoutMs: 10_000 });
    if (r.status === 0) return;
    if (Date.now() > deadline)
      throw new BlkError('IO', `timed out waiting for ${uri}: ${lastLines(r.stderr)}`);
    await sleep(50);
  }
}

/** A QEMU tool in the foreground as our child (its own process group), stopped with SIGTERM. */
function qemuChildServer(
  id: NbdServerId,
  ctx: NbdContext,
  cmd: string,
  args: (image: string, sock: string, writable: boolean) => string[],
): NbdServer {
  const sock = join(ctx.dir, `nbd-${id}.sock`);
  return {
    id,
    async serve(image, writable) {
      await rm(sock, { force: true });
      let pid: number | undefined;
      const stop = ctx.cleanup.add(cmd, async () => {
        if (pid !== undefined) await terminate(pid);
        await rm(sock, { force: true });
      });
      const started = startServer(cmd, args(image, sock, writable));
      pid = started.child.pid;
      try {
        await waitServing(uriFor(sock), () =>
          started.child.exitCode !== null || started.child.signalCode !== null
            ? `${cmd} exited: ${lastLines(started.stderr())}`
            : undefined,
        );
      } catch (e) {
        await stop();
        throw e;
      }
      return {
        uri: uriFor(sock),
        pid,
        stop: async () => {
          await stop();
          await waitExit(started.child, 5_000);
        },
      };
    },
  };
}

/** QEMU's option syntax doubles commas inside values. */
const qv = (s: string): string => s.replaceAll(',', ',,');

function qsdNbd(ctx: NbdContext): NbdServer {
  return qemuChildServer('qsd', ctx, 'qemu-storage-daemon', (image, sock, writable) => [
    '--blockdev',
    `node-name=prot,driver=file,filename=${qv(image)}`,
    '--blockdev',
    'node-name=fmt,driver=qcow2,file=prot',
    '--nbd-server',
    `addr.type=unix,addr.path=${qv(sock)}`,
    '--export',
    `type=nbd,id=exp0,node-name=fmt,name=${EXPORT_NAME},writable=${writable ? 'on' : 'off'}`,
  ]);
}

function qemuNbd(ctx: NbdContext): NbdServer {
  // --shared=0: any number of connections (nbdcopy opens four when multi-conn is advertised).
  return qemuChildServer('qemu-nbd', ctx, 'qemu-nbd', (image, sock, writable) => [
    `--socket=${sock}`,
    '--format=qcow2',
    `--export-name=${EXPORT_NAME}`,
    '--persistent',
    '--shared=0',
    ...(writable ? [] : ['--read-only']),
    image,
  ]);
}

/** `blkexport nbd IMAGE --daemonize --pidfile F`, stopped with SIGTERM (docs/nbd.md). */
function blkexportNbd(ctx: NbdContext): NbdServer {
  const sock = join(ctx.dir, 'nbd-blkexport.sock');
  const pidfile = join(ctx.dir, 'nbd-blkexport.pid');
  const bin = join(ctx.repo, 'bin', 'blkexport');
  return {
    id: 'blkexport',
    async serve(image, writable) {
      if (!existsSync(join(ctx.repo, 'dist', 'cli', 'main.js')))
        throw new BlkError('NOT_SUPPORTED', 'not built (dist/cli/main.js missing: npm run build)');
      await rm(sock, { force: true });
      await rm(pidfile, { force: true });
      let pending: Promise<unknown> | undefined;
      const readPid = async (): Promise<number | undefined> => {
        const pid = Number((await readFile(pidfile, 'utf8').catch(() => '')).trim());
        return Number.isSafeInteger(pid) && pid > 1 ? pid : undefined;
      };
      const stop = ctx.cleanup.add('blkexport nbd', async () => {
        await pending?.catch(() => {});
        const pid = await readPid();
        if (pid !== undefined) await terminate(pid);
        await rm(sock, { force: true });
        await rm(pidfile, { force: true });
      });
      const args = [
        bin,
        'nbd',
        image,
        '--listen',
        `unix:${sock}`,
        '--name',
        EXPORT_NAME,
        '--format',
        'qcow2',
      ];
      if (writable) args.push('--writable');
      args.push('--daemonize', '--pidfile', pidfile);
      try {
        const run = runCommand(process.execPath, args, { timeoutMs: 120_000, server: true });
        pending = run;
        const r = await run;
        pending = undefined;
        if (r.status !== 0)
          throw new BlkError(
            'IO',
            `blkexport nbd exited ${r.status ?? r.signal}: ${lastLines(r.stderr || r.stdout)}`,
          );
        await waitServing(uriFor(sock), () => undefined);
        return { uri: uriFor(sock), pid: await readPid(), stop };
      } catch (e) {
        await stop();
        throw e;
      }
    },
  };
}

/** nbdcopy of the whole export to null: (libnbd's defaults: multi-conn, 64 requests in flight). */
async function runNbdcopy(uri: string, size: number): Promise<{ value: number; bytes: number }> {
  const t0 = process.hrtime.bigint();
  const r = await runCommand('nbdcopy', [uri, 'null:'], { timeoutMs: 30 * 60_000 });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0)
    throw new BlkError('IO', `nbdcopy exited ${r.status ?? r.signal}: ${lastLines(r.stderr)}`);
  return { value: size / s / 1e6, bytes: size };
}

/** The fio command line of an NBD row (fio's nbd ioengine takes the export as a URI, not a file). */
export function nbdFioArgs(row: NbdRow, uri: string, size: number, runtimeS: number): string[] {
  return [
    `--name=${row.id}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--size=${size}`,
    ...(row.fio ?? []),
    '--numjobs=1',
    '--time_based=1',
    '--norandommap=1',
    `--runtime=${runtimeS}`,
    '--randrepeat=1',
    '--output-format=json',
  ];
}

async function runNbdFio(row: NbdRow, uri: string, ctx: NbdContext): Promise<FioResult> {
  const r = await runCommand('fio', nbdFioArgs(row, uri, ctx.size, ctx.runtimeS), {
    timeoutMs: (ctx.runtimeS + 120) * 1000,
  });
  if (r.status !== 0)
    throw new BlkError('IO', `fio exited ${r.status ?? r.signal}: ${lastLines(r.stderr || r.stdout)}`);
  return parseFioJson(r.stdout);
}

async function measureOnce(server: NbdServer, row: NbdRow, image: string, ctx: NbdContext, cell: Cell) {
  const served = await server.serve(image, row.writes);
  try {
    const cpu0 = served.pid ? await cpuSeconds(served.pid) : undefined;
    let bytes: number;
    if (row.fio) {
      const r = await runNbdFio(row, served.uri, ctx);
      bytes = r.bytes;
      cell.raw.push(r);
      cell.values.push(r.readIops + r.writeIops);
    } else {
      const r = await runNbdcopy(served.uri, ctx.size);
      bytes = r.bytes;
      cell.values.push(r.value);
    }
    if (served.pid && cpu0 !== undefined && bytes > 0)
      cell.cpu.push(((await cpuSeconds(served.pid)) - cpu0) / (bytes / 2 ** 30));
  } finally {
    await served.stop();
  }
}

export interface NbdRowResult {
  row: NbdRow;
  cells: Record<NbdServerId, Cell>;
}

export interface NbdOutcome {
  rows: NbdRowResult[];
  /** Markdown section for the report. */
  section: string;
  /** Rows where a QEMU server (the reference) failed: the harness or the machine is broken. */
  referenceFailures: string[];
}

async function preflight(): Promise<void> {
  for (const tool of ['nbdcopy', 'nbdinfo', 'qemu-nbd']) {
    const r = await runCommand('sh', ['-c', `command -v ${tool}`], { timeoutMs: 10_000 });
    if (r.status !== 0)
      throw new BlkError('USAGE', `${tool} is required for the NBD rows (Debian: libnbd-bin, qemu-utils)`);
  }
}

/** Measures `rows` on every NBD server, interleaved, `ctx.reps` times each. */
export async function runNbdRows(rows: NbdRow[], images: BenchImages, ctx: NbdContext): Promise<NbdOutcome> {
  await preflight();
  const servers = [qsdNbd(ctx), qemuNbd(ctx), blkexportNbd(ctx)];
  const results: NbdRowResult[] = [];
  const total = rows.length * servers.length * ctx.reps;
  let done = 0;
  for (const row of rows) {
    const cells = Object.fromEntries(
      NBD_SERVER_IDS.map((id) => [id, { values: [], raw: [], cpu: [] } as Cell]),
    ) as Record<NbdServerId, Cell>;
    for (let rep = 0; rep < ctx.reps; rep++) {
      const order = servers.map((_, i) => servers[(i + rep) % servers.length]!);
      for (const server of order) {
        if (ctx.cleanup.aborting) throw new BlkError('AGENT', 'interrupted');
        const cell = cells[server.id];
        if (cell.failure) continue;
        done++;
        try {
          await measureOnce(server, row, images[row.image].qcow2, ctx, cell);
          ctx.log(
            `[nbd ${done}/${total}] ${row.id} ${server.id} rep ${rep + 1}: ${cell.values.at(-1)!.toFixed(1)} ${row.unit}`,
          );
        } catch (e) {
          cell.failure = describeError(e).replaceAll(ctx.dir, '$TMP');
          ctx.log(`[nbd ${done}/${total}] ${row.id} ${server.id} rep ${rep + 1}: n/a: ${cell.failure}`);
        }
      }
    }
    results.push({ row, cells });
  }
  return {
    rows: results,
    section: renderNbdSection(results),
    referenceFailures: results
      .filter((r) => r.cells.qsd.failure || r.cells['qemu-nbd'].failure)
      .map((r) => r.row.id),
  };
}

function fmt(v: number, unit: Unit): string {
  if (unit === 'IOPS') return v >= 1000 ? `${(v / 1000).toFixed(1)} k` : v.toFixed(0);
  return v >= 100 ? v.toFixed(0) : v.toFixed(1);
}

function ratio(a: Cell, b: Cell): string {
  if (!a.values.length || !b.values.length) return '—';
  const den = summarize(b.values).median;
  return den > 0 ? `${(summarize(a.values).median / den).toFixed(2)}×` : '—';
}

/** The report's NBD section: medians (min–max), the two ratios and CPU seconds per GiB. */
export function renderNbdSection(rows: NbdRowResult[]): string {
  const notes: string[] = [];
  const cell = (c: Cell, unit: Unit): string => {
    if (!c.values.length) {
      let i = notes.indexOf(c.failure ?? 'not run');
      if (i < 0) i = notes.push(c.failure ?? 'not run') - 1;
      return `n/a [N${i + 1}]`;
    }
    const s = summarize(c.values);
    return c.values.length > 1
      ? `${fmt(s.median, unit)} (${fmt(s.min, unit)}–${fmt(s.max, unit)})`
      : fmt(s.median, unit);
  };
  const cpu = (c: Cell): string => (c.cpu.length ? summarize(c.cpu).median.toFixed(2) : '—');
  const out = [
    '## NBD',
    '',
    'The allocated qcow2 served over a Unix socket by qemu-storage-daemon (`--export type=nbd`), qemu-nbd and',
    '`blkexport nbd`, one at a time, all through the host page cache. nbdcopy copies the whole export to `null:`',
    '(MB/s = image size / wall time); the fio rows use its `nbd` ioengine (libnbd). CPU = the serving process.',
    '',
    '| workload | unit | QSD | qemu-nbd | blkexport | blkexport / QSD | blkexport / qemu-nbd | CPU s/GiB QSD | CPU s/GiB qemu-nbd | CPU s/GiB blkexport |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const { row, cells } of rows) {
    const u = row.unit;
    out.push(
      `| ${row.title} | ${u} | ${cell(cells.qsd, u)} | ${cell(cells['qemu-nbd'], u)} | ${cell(cells.blkexport, u)} | ${ratio(cells.blkexport, cells.qsd)} | ${ratio(cells.blkexport, cells['qemu-nbd'])} | ${cpu(cells.qsd)} | ${cpu(cells['qemu-nbd'])} | ${cpu(cells.blkexport)} |`,
    );
  }
  out.push('');
  if (notes.length) out.push(...notes.map((n, i) => `[N${i + 1}] ${n.replaceAll('|', '\\|')}`), '');
  out.push('| workload | id | how |', '|---|---|---|');
  for (const { row } of rows)
    out.push(
      `| ${row.title} | \`${row.id}\` | \`${row.fio ? `fio --ioengine=nbd --uri=URI ${row.fio.join(' ')}` : 'nbdcopy URI null:'}\` |`,
    );
  out.push('');
  return out.join('\n');
}
