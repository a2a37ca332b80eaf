/**
 * Worker thread of the qcow2 fuzzer: mutates seed images (or replays given
 * files) and checks each, telling the main thread which input it is on before
 * it starts, so a hang, a crash or an out-of-memory kill can be pinned on it.
 */
import { copyFileSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parentPort, workerData } from 'node:worker_threads';
import { checkImage } from './qcow2-check.js';
import { type Layout, mutate, parseLayout } from './qcow2-mutate.js';

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
      violation?: string;
      ms: number;
      rss: number;
      /** The input as it was before the check (a read-write check changes the file), with a violation. */
      image?: Buffer;
    }
  | { type: 'end' };

const job = workerData as WorkerJob;
const post = (m: WorkerMessage) => parentPort!.postMessage(m);

async function main(): Promise<void> {
  const roots = [job.corpusDir];
  if (job.files) {
    for (const f of job.files) {
      const before = readFileSync(f.path);
      if (job.writes) writeFileSync(`${f.path}.orig`, before);
      post({ type: 'start', seed: f.seed, base: f.name, steps: [], input: f.path });
      const t0 = performance.now();
      const r = await checkImage(f.path, roots, f.seed, job.writes, job.readBack);
      const ms = performance.now() - t0;
      post({
        type: 'done',
        seed: f.seed,
        ...r,
        ms,
        rss: process.memoryUsage().rss,
        ...(r.violation ? { image: before } : {}),
      });
    }
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
    const r = await checkImage(input, [dir], seed, job.writes, job.readBack);
    const ms = performance.now() - t0;
    post({
      type: 'done',
      seed,
      ...r,
      ms,
      rss: process.memoryUsage().rss,
      ...(r.violation ? { image: m.image } : {}),
    });
  }
  post({ type: 'end' });
}

await main();
