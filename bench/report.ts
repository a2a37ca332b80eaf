/**
 * The benchmark report: medians, min–max, the ratios blkexport/QSD and
 * blkexport/plain file in the same cache mode, and each server's CPU seconds
 * per GiB moved, as a Markdown document with the machine description.
 */
import type { AgentOutcome } from './agent.js';
import { renderAgentSection } from './agent.js';
import type { FioResult } from './fio.js';
import type { MachineInfo } from './machine.js';
import type { ServerId } from './servers.js';
import type { Workload } from './workloads.js';

/** What one server did on one workload: a headline figure per repetition, or why it could not run. */
export interface Cell {
  values: number[];
  raw: FioResult[];
  /** The serving process's user + system CPU seconds per GiB read and written, per repetition. */
  cpu: number[];
  /** blkexport served with FUSE passthrough: the kernel did the I/O on the image file, O_DIRECT included. */
  passthrough?: boolean;
  failure?: string;
}

/** The plain-cached column's "reason" on buffered rows: the plain column is already through the page cache. */
export const SAME_AS_PLAIN = 'buffered row: the plain column is already the host page cache';

export interface RowResult {
  workload: Workload;
  cells: Record<ServerId, Cell>;
}

export interface RunMeta {
  started: Date;
  finished: Date;
  command: string;
  sizeBytes: number;
  runtimeS: number;
  reps: number;
  quick: boolean;
  machine: MachineInfo;
}

export interface Summary {
  median: number;
  min: number;
  max: number;
}

/** Median, minimum and maximum of a non-empty list. */
export function summarize(values: number[]): Summary {
  const s = [...values].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  const median = s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { median, min: s[0]!, max: s[s.length - 1]! };
}

function fmt(v: number, unit: Workload['unit']): string {
  if (unit === 'IOPS') return v >= 1000 ? `${(v / 1000).toFixed(1)} k` : v.toFixed(0);
  return v >= 100 ? v.toFixed(0) : v.toFixed(1);
}

function fmtRange(values: number[], unit: Workload['unit']): string {
  const s = summarize(values);
  return values.length > 1
    ? `${fmt(s.median, unit)} (${fmt(s.min, unit)}–${fmt(s.max, unit)})`
    : fmt(s.median, unit);
}

function cpuPerGiB(c: Cell): string {
  return c.cpu.length ? summarize(c.cpu).median.toFixed(2) : '—';
}

function ratio(a: Cell, b: Cell): string {
  if (!a.values.length || !b.values.length) return '—';
  const den = summarize(b.values).median;
  return den > 0 ? `${(summarize(a.values).median / den).toFixed(2)}×` : '—';
}

/** Renders the whole report. */
export function renderReport(meta: RunMeta, rows: RowResult[], agent: AgentOutcome): string {
  const m = meta.machine;
  const notes: string[] = [];
  const note = (reason: string): string => {
    let i = notes.indexOf(reason);
    if (i < 0) i = notes.push(reason) - 1;
    return `n/a [${i + 1}]`;
  };
  const cell = (c: Cell, unit: Workload['unit']): string => {
    if (c.failure === SAME_AS_PLAIN) return '= plain';
    if (!c.values.length) return note(c.failure ?? 'not run');
    const partial = c.failure ? ` (${c.values.length} runs; then ${note(c.failure)})` : '';
    return fmtRange(c.values, unit) + partial;
  };
  const gib = meta.sizeBytes / 2 ** 30;
  const out: string[] = [
    `# blkexport benchmark, ${meta.started.toISOString().slice(0, 16).replace('T', ' ')} UTC${meta.quick ? ' (quick run: not for quoting)' : ''}`,
    '',
    `Command: \`${meta.command}\` — images of ${gib >= 1 ? `${gib} GiB` : `${meta.sizeBytes / 2 ** 20} MiB`}, ` +
      `${meta.reps} repetition${meta.reps > 1 ? 's' : ''} of ${meta.runtimeS} s per server and workload, servers interleaved; ` +
      `took ${Math.round((meta.finished.getTime() - meta.started.getTime()) / 1000)} s.`,
    '',
    '| machine | |',
    '|---|---|',
    `| CPU | ${m.cpu}, ${m.nproc} CPUs |`,
    `| memory | ${m.memoryGiB} GiB |`,
    `| kernel / OS | ${m.kernel} / ${m.os} |`,
    `| qemu-storage-daemon | ${m.qemu} |`,
    `| fio | ${m.fio} |`,
    `| node | ${m.node} |`,
    `| blkexport | ${m.blkexport} |`,
    '',
    '## I/O',
    '',
    'Medians (min–max) of the repetitions. MB/s = 10^6 bytes per second; IOPS counts reads and writes.',
    'QSD = qemu-storage-daemon FUSE export of the image; blkexport = `blkexport mount` of the same image',
    '(the qcow2, or on "raw image" rows its raw twin exported as raw); plain = fio on the raw twin on the',
    'host file system, same job; host cache = for O_DIRECT rows, the raw twin read once and then the same job',
    'with `--direct=0`, which is the cache mode both exports use for their image file.',
    'vs plain compares blkexport with the plain file in the same cache mode: plain on buffered rows, host',
    'cache on O_DIRECT rows, except where blkexport served with FUSE passthrough (marked): the kernel then',
    'does the job on the image file itself, O_DIRECT included, so its baseline is the plain column.',
    "CPU = the serving process's user + system seconds per GiB read and written.",
    '',
    '| workload | unit | QSD | blkexport | plain | host cache | blkexport / QSD | blkexport / plain, same cache mode | CPU s/GiB QSD | CPU s/GiB blkexport |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const r of rows) {
    const { qsd, blkexport, plain } = r.cells;
    const cached = r.cells['plain-cached'];
    // With passthrough an O_DIRECT job reaches the image file with O_DIRECT: the plain column is its mode.
    const sameMode = cached.failure === SAME_AS_PLAIN || blkexport.passthrough ? plain : cached;
    const u = r.workload.unit;
    out.push(
      `| ${r.workload.title} | ${u} | ${cell(qsd, u)} | ${cell(blkexport, u)}${blkexport.passthrough ? ' (passthrough)' : ''} | ${cell(plain, u)} | ${cell(cached, u)} | ${ratio(blkexport, qsd)} | ${ratio(blkexport, sameMode)} | ${cpuPerGiB(qsd)} | ${cpuPerGiB(blkexport)} |`,
    );
  }
  out.push('');
  if (notes.length) {
    out.push(...notes.map((n, i) => `[${i + 1}] ${n.replaceAll('|', '\\|')}`), '');
  }
  out.push(renderAgentSection(agent));
  out.push('## Workloads', '', '| workload | id | fio options |', '|---|---|---|');
  for (const r of rows) {
    const w = r.workload;
    out.push(
      `| ${w.title} | \`${w.id}\` | \`${w.fio.join(' ')}${w.onePass ? ' (one pass, runtime cap)' : ''}\` |`,
    );
  }
  out.push(
    '',
    'Every job also has `--numjobs=1 --invalidate=0 --fallocate=none --randrepeat=1 --runtime=N` and is time-based ' +
      '(`--time_based=1 --norandommap=1`) unless marked one pass. See docs/benchmarks.md.',
    '',
  );
  return out.join('\n');
}
