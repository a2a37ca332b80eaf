/**
 * Worker thread of the qcow2 fuzzer: mutates seed images (or replays given
 * files) and checks each, telling the main thread which input it is on before
 * it starts, so a hang, a crash or an out-of-memory kill can be pinned on it.
 */
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { checkImage } from './qcow2-check.js';
import { type Layout, mutate, parseLayout } from './qcow2-mutate.js';
import { compareWithQemu, type OracleEntry } from './qemu-oracle.js';

export interface WorkerJob {
  id: number;
  corpusDir: string;
  seeds: { name: string; path: string }[];
  /** Mutation mode: seeds firstSeed, firstSeed + stride, ... until deadline (epoch ms) or count. */
  firstSeed: number;
  stride: number;
  deadline: number;
  maxImages: number;
  /** Replay mode: these files instead of mutations. */
  files?: { name: string; path: string; seed: number }[];
  /** Open read-write and write too (see checkImage), and check that writes read back. */
  writes?: boolean;
  readBack?: boolean;
  /** Compare what read-only mutants serve with qemu-img convert (qcow2-check.ts). */
  oracle?: boolean;
}

export type WorkerMessage =
  | { type: 'start'; seed: number; base: string; steps: string[]; input: string }
  | {
      type: 'done';
      seed: number;
      outcome: string;
      codes: string[];
      readErrors: number;
      inflateCompared: number;
      readBackBytes: number;
      violation?: string;
      oracle?: string;
      ms: number;
      rss: number;
      /** The input as it was before the check (a read-write check changes the file), with a violation. */
      image?: Buffer;
    }
  | {
      /** The oracle's verdict on an input done earlier (compared in batches). */
      type: 'oracle';
      seed: number;
      base: string;
      steps: string[];
      outcome: 'compared' | 'qemu-refused';
      violation?: string;
      image?: Buffer;
    }
  | { type: 'end' };

const job = workerData as WorkerJob;
const post = (m: WorkerMessage) => parentPort!.postMessage(m);

/**
 * Inputs whose window waits for qemu-img (a copy of each, beside the input so
 * relative names resolve alike), converted a batch at a time while the
 * worker checks the next inputs (one batch in flight).
 */
const ORACLE_BATCH = 24;
let batch: (OracleEntry & { seed: number; base: string; steps: string[] })[] = [];
let batches = 0;
let inFlight: Promise<void> = Promise.resolve();

async function flushOracle(dir: string): Promise<void> {
  await inFlight;
  if (batch.length === 0) return;
  const these = batch;
  batch = [];
  const out = join(dir, `oracle-w${job.id}-${batches++}.raw`);
  inFlight = compareWithQemu(these, out).then((outcomes) =>
    these.forEach((e, i) => {
      const o = outcomes[i];
      const image = o ? readFileSync(e.path) : undefined;
      rmSync(e.path, { force: true });
      post({
        type: 'oracle',
        seed: e.seed,
        base: e.base,
        steps: e.steps,
        outcome: o === null ? 'qemu-refused' : 'compared',
        ...(o ? { violation: `blkexport and qemu-img convert differ: ${o}`, image } : {}),
      });
    }),
  );
}

/** The done message of a check (its oracle window queued for qemu-img). */
function done(
  r: Awaited<ReturnType<typeof checkImage>>,
  at: { input: string; dir: string; seed: number; base: string; steps: string[]; image: Buffer },
  ms: number,
): WorkerMessage {
  const { window, ...rest } = r;
  if (window) {
    const path = join(at.dir, `oracle-w${job.id}-${batches}-${batch.length}.qcow2`);
    writeFileSync(path, at.image);
    batch.push({ path, want: window, seed: at.seed, base: at.base, steps: at.steps });
  }
  return {
    type: 'done',
    seed: at.seed,
    ...rest,
    ms,
    rss: process.memoryUsage().rss,
    ...(r.violation ? { image: at.image } : {}),
  };
}

async function main(): Promise<void> {
  const roots = [job.corpusDir];
  if (job.files) {
    for (const f of job.files) {
      const before = readFileSync(f.path);
      if (job.writes) writeFileSync(`${f.path}.orig`, before);
      post({ type: 'start', seed: f.seed, base: f.name, steps: [], input: f.path });
      const t0 = performance.now();
      const r = await checkImage(f.path, roots, f.seed, job.writes, job.readBack, job.oracle);
      const ms = performance.now() - t0;
      const at = {
        input: f.path,
        dir: dirname(f.path),
        seed: f.seed,
        base: f.name,
        steps: [],
        image: before,
      };
      post(done(r, at, ms));
      if (batch.length >= ORACLE_BATCH) await flushOracle(dirname(f.path));
    }
    if (job.files.length > 0) await flushOracle(dirname(job.files[0]!.path));
    await inFlight;
    post({ type: 'end' });
    return;
  }
  const layouts = new Map<string, { bytes: Buffer; layout: Layout }>();
  // Writes reach external data files (and whatever file a mutated name points at): each writing
  // worker gets its own copy of the corpus, so workers never write each other's files.
  let dir = job.corpusDir;
  if (job.writes) {
    dir = join(job.corpusDir, `w${job.id}`);
    mkdirSync(dir, { recursive: true });
    for (const f of readdirSync(job.corpusDir)) {
      const from = join(job.corpusDir, f);
      if (statSync(from).isFile()) copyFileSync(from, join(dir, f));
    }
  }
  const input = join(dir, `fuzz-w${job.id}.qcow2`);
  for (let i = 0; i < job.maxImages && Date.now() < job.deadline; i++) {
    const seed = job.firstSeed + i * job.stride;
    const base = job.seeds[seed % job.seeds.length]!;
    let l = layouts.get(base.name);
    if (!l) {
      const bytes = readFileSync(base.path);
      l = { bytes, layout: parseLayout(bytes) };
      layouts.set(base.name, l);
    }
    const m = mutate(l.bytes, l.layout, seed);
    writeFileSync(input, m.image);
    // The main thread reads `.orig` when this input hangs or kills the worker (a write check changes the file).
    if (job.writes) writeFileSync(`${input}.orig`, m.image);
    post({ type: 'start', seed, base: base.name, steps: m.steps, input });
    const t0 = performance.now();
    const r = await checkImage(input, [dir], seed, job.writes, job.readBack, job.oracle);
    const ms = performance.now() - t0;
    post(done(r, { input, dir, seed, base: base.name, steps: m.steps, image: m.image }, ms));
    if (batch.length >= ORACLE_BATCH) await flushOracle(dir);
  }
  await flushOracle(dir);
  await inFlight;
  post({ type: 'end' });
}

await main();
