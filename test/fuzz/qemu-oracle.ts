/**
 * The fuzzer's oracle: what blkexport served of a read-only mutant must be
 * byte-identical to `qemu-img convert -O raw` of the same image. One qemu-img
 * process converts a whole batch (its sources are concatenated into one
 * output, each a raw window [0, n) over the qcow2, so a mutated petabyte disk
 * converts only its window): process start-up, not conversion, is qemu-img's
 * cost per image. A source qemu-img refuses (open or read error) is named by
 * its message; it is taken out (refused by qemu) and the rest converted again.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync, readSync, rmSync } from 'node:fs';
import { dirname } from 'node:path';

export interface OracleEntry {
  /** The mutant (a file of its own, next to its backing and data files). */
  path: string;
  /** What blkexport read of guest [0, want.length) (a multiple of 512). */
  want: Buffer;
}

/** Per entry: '' (identical), where the bytes differ, or null (qemu-img refused the image). */
export type OracleOutcome = string | null;

function sourceOpts(e: OracleEntry): string {
  const file = e.path.replaceAll(',', ',,');
  return `driver=raw,size=${e.want.length},file.driver=qcow2,file.file.driver=file,file.file.filename=${file}`;
}

function diff(want: Buffer, got: Buffer): string {
  if (got.equals(want)) return '';
  let at = 0;
  while (got[at] === want[at]) at++;
  return `guest byte ${at} reads ${want[at]} through blkexport, ${got[at]} through qemu-img convert`;
}

/** Runs qemu-img; its exit status (null: killed by the timeout or a signal) and stderr. */
function qemuImg(args: string[], cwd: string): Promise<{ status: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn('qemu-img', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'], timeout: 20_000 });
    let stderr = '';
    p.stderr.on('data', (d) => {
      stderr += d;
    });
    p.on('error', (e) => resolve({ status: null, stderr: String(e) }));
    p.on('close', (status) => resolve({ status, stderr }));
  });
}

/** Converts `entries` into `out` with one qemu-img: the bytes, or the index of the source its failure names (-1: none). */
async function convert(entries: OracleEntry[], out: string): Promise<Buffer | number> {
  const opts = entries.map(sourceOpts);
  // qemu-img opens a relative external data file name from its working directory (blkexport: from the
  // image's): it runs where the mutants lie, so both read the same file.
  const r = await qemuImg(
    ['convert', '-U', '-t', 'unsafe', '-O', 'raw', '--image-opts', ...opts, out],
    dirname(entries[0]!.path),
  );
  if (r.status === 0) {
    const total = entries.reduce((n, e) => n + e.want.length, 0);
    const got = Buffer.alloc(total);
    const fd = openSync(out, 'r');
    try {
      readSync(fd, got, 0, total, 0);
    } finally {
      closeSync(fd);
    }
    return got;
  }
  const named = opts.findIndex((o) => r.stderr.includes(`'${o}'`));
  if (named >= 0) return named;
  const at = /error while reading at byte (\d+)/.exec(r.stderr);
  if (at) {
    let end = 0;
    for (let i = 0; i < entries.length; i++) {
      end += entries[i]!.want.length;
      if (Number(at[1]) < end) return i;
    }
  }
  return -1;
}

/** Compares every entry with qemu-img convert, in as few qemu-img runs as the refusals allow. */
export async function compareWithQemu(entries: OracleEntry[], out: string): Promise<OracleOutcome[]> {
  const result: OracleOutcome[] = new Array(entries.length).fill(null);
  let pending = entries.map((_, i) => i);
  try {
    while (pending.length > 0) {
      const got = await convert(
        pending.map((i) => entries[i]!),
        out,
      );
      if (Buffer.isBuffer(got)) {
        let at = 0;
        for (const i of pending) {
          const want = entries[i]!.want;
          result[i] = diff(want, got.subarray(at, at + want.length));
          at += want.length;
        }
        return result;
      }
      if (got < 0) {
        // A failure that names no source (a crash, a timeout): each alone; one that fails alone is refused.
        if (pending.length === 1) return result;
        for (const i of pending) result[i] = (await compareWithQemu([entries[i]!], out))[0]!;
        return result;
      }
      pending = pending.filter((_, k) => k !== got);
    }
    return result;
  } finally {
    rmSync(out, { force: true });
  }
}
