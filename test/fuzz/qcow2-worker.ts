/**
 * Worker thread of the qcow2 fuzzer: mutates seed images (or replays given
 * files) and checks each, telling the main thread which input it is on before
 * it starts, so a hang, a crash or an out-of-memory kill can be pinned on it.
 */
import { readFileSync, writeFileSync } from 'node:fs';
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
}

export type WorkerMessage =
  | { type: 'start'; seed: number; base: string; steps: string[]; input: string }
  | {
      type: 'done';
      seed: number;
      outcome: string;
      codes: string[];
      readErrors: number;
      violation?: string;
      ms: number;
      rss: number;
    }
  | { type: 'end' };

const job = workerData as WorkerJob;
const post = (m: WorkerMessage) => parentPort!.postMessage(m);

async function main(): Promise<void> {
  const roots = [job.corpusDir];
  if (job.files) {
    for (const f of job.files) {
      post({ type: 'start', seed: f.seed, base: f.name, steps: [], input: f.path });
      const t0 = performance.now();
      const r = await checkImage(f.path, roots, f.seed);
      post({ type: 'done', seed: f.seed, ...r, ms: performance.now() - t0, rss: process.memoryUsage().rss });
    }
    post({ type: 'end' });
    return;
  }
  const layouts = new Map<string, { bytes: Buffer; layout: Layout }>();
  const input = join(job.corpusDir, `fuzz-w${job.id}.qcow2`);
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
    post({ type: 'start', seed, base: base.name, steps: m.steps, input });
    const t0 = performance.now();
    const r = await checkImage(input, roots, seed);
    post({ type: 'done', seed, ...r, ms: performance.now() - t0, rss: process.memoryUsage().rss });
  }
  post({ type: 'end' });
}

await main();
