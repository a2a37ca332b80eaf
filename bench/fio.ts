/**
 * fio runs and the parse of their JSON output. Options that keep numbers
 * honest: --invalidate=0 so fio does not evict the image from the page cache
 * between runs (which would hand one server a cold cache the others did not
 * get); time-based runs; no pre-allocation (a non-growable export refuses
 * size changes).
 */
import { BlkError } from '../src/errors.js';
import { runCommand } from './proc.js';
import type { Workload } from './workloads.js';

export interface FioResult {
  readIops: number;
  writeIops: number;
  /** Bytes per second. */
  readBw: number;
  writeBw: number;
  /** Bytes moved, read + written (for CPU seconds per GiB). */
  bytes: number;
  /** 99th percentile completion latency in microseconds, reads and writes (0 when there were none). */
  readP99Us: number;
  writeP99Us: number;
}

/**
 * The fio command line for `workload` on `file` for `runtimeS` seconds;
 * `buffered` turns an O_DIRECT job into the same job through the page cache.
 */
export function fioArgs(workload: Workload, file: string, runtimeS: number, buffered = false): string[] {
  return [
    `--name=${workload.id}`,
    `--filename=${file}`,
    ...workload.fio.map((o) => (buffered && o === '--direct=1' ? '--direct=0' : o)),
    '--numjobs=1',
    // A one-pass job covers the file once with fio's random map (each block exactly once).
    ...(workload.onePass ? ['--time_based=0', '--norandommap=0'] : ['--time_based=1', '--norandommap=1']),
    `--runtime=${runtimeS}`,
    '--invalidate=0',
    '--fallocate=none',
    '--randrepeat=1',
    '--output-format=json',
  ];
}

interface FioDir {
  iops?: number;
  bw_bytes?: number;
  io_bytes?: number;
  clat_ns?: { percentile?: Record<string, number> };
}

function p99(dir: FioDir | undefined): number {
  const v = dir?.clat_ns?.percentile?.['99.000000'];
  return typeof v === 'number' ? v / 1000 : 0;
}

/** Parses fio's --output-format=json (fio may print warnings before the JSON object). */
export function parseFioJson(text: string): FioResult {
  const start = text.indexOf('{');
  if (start < 0) throw new BlkError('IO', `fio printed no JSON: ${text.slice(0, 200)}`);
  let doc: { jobs?: { error?: number; read?: FioDir; write?: FioDir }[] };
  try {
    doc = JSON.parse(text.slice(start));
  } catch (e) {
    throw new BlkError('IO', `fio printed malformed JSON: ${(e as Error).message}`);
  }
  const job = doc.jobs?.[0];
  if (!job) throw new BlkError('IO', 'fio JSON has no job');
  if (job.error) throw new BlkError('IO', `fio job failed with error ${job.error}`);
  return {
    readIops: job.read?.iops ?? 0,
    writeIops: job.write?.iops ?? 0,
    readBw: job.read?.bw_bytes ?? 0,
    writeBw: job.write?.bw_bytes ?? 0,
    bytes: (job.read?.io_bytes ?? 0) + (job.write?.io_bytes ?? 0),
    readP99Us: p99(job.read),
    writeP99Us: p99(job.write),
  };
}

/** Runs fio for `workload` on `file`; a BlkError with fio's complaint when it fails. */
export async function runFio(
  workload: Workload,
  file: string,
  runtimeS: number,
  buffered = false,
): Promise<FioResult> {
  const r = await runCommand('fio', fioArgs(workload, file, runtimeS, buffered), {
    timeoutMs: (runtimeS + 120) * 1000,
  });
  if (r.status !== 0) {
    const why = (r.stderr.trim() || r.stdout.trim()).split('\n').slice(-3).join(' / ');
    throw new BlkError('IO', `fio exited ${r.status ?? r.signal}: ${why}`);
  }
  return parseFioJson(r.stdout);
}

/** The figure a report row shows for a result: MB/s (10^6 bytes, read + write) or IOPS (read + write). */
export function headline(workload: Workload, r: FioResult): number {
  return workload.unit === 'MB/s' ? (r.readBw + r.writeBw) / 1e6 : r.readIops + r.writeIops;
}
