/**
 * The qcow2 fuzzer's driver: builds the seed corpus, runs worker threads over
 * seeded mutations for a time budget, and watches them: an input whose check
 * outlives the per-image bound (a hang), kills its worker (a crash, or the
 * heap limit) or breaks a promise (see qcow2-check.ts) is a failure, saved as
 * a regression fixture (the image gzipped, plus seed and mutation steps).
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { gzipSync } from 'node:zlib';
import { buildSeedCorpus, type SeedImage } from './qcow2-corpus.js';
import type { WorkerJob, WorkerMessage } from './qcow2-worker.js';

export interface FuzzFailure {
  base: string;
  seed: number;
  steps: string[];
  reason: string;
  /** Found with writes (replay it read-write). */
  writes: boolean;
  /** The failing image (kept in memory only until saved). */
  image: Buffer;
}

export interface FuzzStats {
  images: number;
  refused: number;
  served: number;
  servedWithReadErrors: number;
  /** Compressed clusters inflated by both the native and the JavaScript decoder. */
  inflateCompared: number;
  /** The oracle: served read-only mutants whose bytes were compared with qemu-img convert, and how many differed. */
  compared: number;
  differed: number;
  /** Served by blkexport but not compared: qemu-img failed on them, or blkexport answered a read error in the window. */
  qemuRefused: number;
  blkReadError: number;
  /** With writes and read-back: images whose writes were read back (some byte verified), and the bytes verified. */
  readBackImages: number;
  readBackBytes: number;
  codes: Record<string, number>;
  maxImageMs: number;
  peakRss: number;
  elapsedMs: number;
  failures: FuzzFailure[];
}

export interface FuzzOptions {
  /** Where seed images are built (and mutants written); must exist. */
  corpusDir: string;
  budgetMs: number;
  /** First mutation seed (a run covers seed, seed+1, ... across workers). */
  seed: number;
  workers: number;
  /** A check slower than this is a hang (the worker is killed and replaced). */
  perImageMs: number;
  /** Fails the run when the process RSS exceeds this. */
  maxRss: number;
  maxImages?: number;
  /** Replays these files instead of mutating. */
  files?: { name: string; path: string; seed: number }[];
  /** Prebuilt seed corpus (else built in corpusDir). */
  seeds?: SeedImage[];
  /** Open the mutants read-write and write, zero and discard too. */
  writes?: boolean;
  /** With writes: what succeeded must read back (default true). */
  readBack?: boolean;
  /** Read-only: compare what blkexport serves with qemu-img convert (default true). */
  oracle?: boolean;
}

const WORKER = new URL('./qcow2-worker-boot.mjs', import.meta.url);

/** Runs the fuzzer (or a replay) and returns what it saw; never throws for a failing input. */
export async function runQcow2Fuzz(o: FuzzOptions): Promise<FuzzStats> {
  const seeds = o.seeds ?? (o.files ? [] : buildSeedCorpus(o.corpusDir));
  const t0 = Date.now();
  const deadline = t0 + o.budgetMs;
  const stats: FuzzStats = {
    images: 0,
    refused: 0,
    served: 0,
    servedWithReadErrors: 0,
    inflateCompared: 0,
    compared: 0,
    differed: 0,
    qemuRefused: 0,
    blkReadError: 0,
    readBackImages: 0,
    readBackBytes: 0,
    codes: {},
    maxImageMs: 0,
    peakRss: 0,
    elapsedMs: 0,
    failures: [],
  };
  const maxImages = o.maxImages ?? Number.MAX_SAFE_INTEGER;
  const fail = (cur: Extract<WorkerMessage, { type: 'start' }>, reason: string, given?: Uint8Array) => {
    let image = given ? Buffer.from(given) : Buffer.alloc(0);
    try {
      if (!given) image = readFileSync(o.writes ? `${cur.input}.orig` : cur.input);
    } catch {
      // the input is gone: the seed and steps still reproduce it
    }
    stats.failures.push({
      base: cur.base,
      seed: cur.seed,
      steps: cur.steps,
      reason,
      image,
      writes: !!o.writes,
    });
  };

  // One lane per worker; a lane whose worker dies restarts past the input that killed it.
  const lane = (id: number, files: FuzzOptions['files']) =>
    new Promise<void>((resolve) => {
      let next = o.seed + id;
      let fileIdx = 0;
      const start = () => {
        if (Date.now() >= deadline || stats.images >= maxImages || (files && fileIdx >= files.length)) {
          resolve();
          return;
        }
        const job: WorkerJob = {
          id,
          corpusDir: o.corpusDir,
          seeds,
          firstSeed: next,
          stride: o.workers,
          deadline,
          maxImages: Math.ceil((maxImages - stats.images) / o.workers),
          ...(files ? { files: files.slice(fileIdx) } : {}),
          ...(o.writes ? { writes: true, readBack: o.readBack ?? true } : { oracle: o.oracle ?? true }),
        };
        const w = new Worker(WORKER, { workerData: job, resourceLimits: { maxOldGenerationSizeMb: 768 } });
        let cur: Extract<WorkerMessage, { type: 'start' }> | undefined;
        let startedAt = 0;
        let finished = false;
        const finish = (restart: boolean) => {
          if (finished) return;
          finished = true;
          clearInterval(watch);
          if (restart) start();
          else resolve();
        };
        const watch = setInterval(() => {
          if (cur && Date.now() - startedAt > o.perImageMs) {
            fail(cur, `no answer within ${o.perImageMs} ms (a hang)`);
            stats.images++;
            cur = undefined;
            void w.terminate();
            finish(true);
          }
        }, 100);
        w.on('message', (m: WorkerMessage) => {
          if (finished) return; // a worker the watchdog terminated may still deliver queued messages
          if (m.type === 'start') {
            cur = m;
            startedAt = Date.now();
            next = m.seed + o.workers;
            if (files) fileIdx++;
          } else if (m.type === 'done') {
            stats.images++;
            stats.maxImageMs = Math.max(stats.maxImageMs, m.ms);
            stats.peakRss = Math.max(stats.peakRss, m.rss);
            if (m.outcome === 'refused') stats.refused++;
            else stats.served++;
            if (m.readErrors > 0) stats.servedWithReadErrors++;
            stats.inflateCompared += m.inflateCompared;
            if (m.oracle === 'blk-read-error') stats.blkReadError++;
            if (m.readBackBytes > 0) stats.readBackImages++;
            stats.readBackBytes += m.readBackBytes;
            for (const c of m.codes) stats.codes[c] = (stats.codes[c] ?? 0) + 1;
            if (m.violation && cur) fail(cur, m.violation, m.image);
            else if (m.rss > o.maxRss && cur) fail(cur, `process RSS ${m.rss} above ${o.maxRss}`);
            cur = undefined;
          } else if (m.type === 'oracle') {
            if (m.outcome === 'compared') stats.compared++;
            else stats.qemuRefused++;
            if (m.violation) {
              stats.differed++;
              stats.failures.push({
                ...m,
                reason: m.violation,
                image: Buffer.from(m.image ?? []),
                writes: false,
              });
            }
          } else finish(false);
        });
        w.on('error', (e) => {
          if (finished) return;
          if (cur) fail(cur, `worker died: ${e.stack ?? e.message}`);
          cur = undefined;
          finish(true);
        });
        w.on('exit', () => finish(false));
      };
      start();
    });

  if (o.files) {
    await lane(0, o.files);
  } else {
    await Promise.all(Array.from({ length: o.workers }, (_, i) => lane(i, undefined)));
  }
  stats.elapsedMs = Date.now() - t0;
  return stats;
}

/** Writes each failure as test/fixtures/fuzz/<base>-<seed>.qcow2.gz and .json; returns the names. */
export function saveFailures(dir: string, failures: FuzzFailure[]): string[] {
  mkdirSync(dir, { recursive: true });
  const names: string[] = [];
  for (const f of failures) {
    const name = `${f.base}-${f.seed}`;
    writeFileSync(join(dir, `${name}.qcow2.gz`), gzipSync(f.image, { level: 9 }));
    const meta = {
      writes: f.writes,
      base: f.base,
      seed: f.seed,
      steps: f.steps,
      failure: f.reason.split('\n')[0],
      found: new Date().toISOString(),
    };
    writeFileSync(join(dir, `${name}.json`), `${JSON.stringify(meta, null, 2)}\n`);
    names.push(name);
  }
  return names;
}
