/**
 * runPowerLoss in a worker thread. The test process's node:test harness
 * tracks every promise with an async hook (about 40 % of a power-loss run's
 * CPU time went to it); a worker thread has no such hook, and two workloads
 * checked in two threads use both CPUs of a small CI machine. The workload
 * travels by name (its functions cannot cross threads), the result back as
 * plain data.
 */
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { type PowerLossOptions, type PowerLossResult, runPowerLoss } from './powerloss.js';
import { WORKLOADS } from './workloads.js';

interface Job {
  powerLossJob: { dir: string; workload: string; options: PowerLossOptions };
}

type Reply = { result: PowerLossResult } | { error: string };

/** Runs the workload named `workload` in a new thread; resolves with its result. */
export function runPowerLossInThread(
  dir: string,
  workload: string,
  options: PowerLossOptions,
): Promise<PowerLossResult> {
  const job: Job = { powerLossJob: { dir, workload, options } };
  const self = new URL(import.meta.url);
  // From TypeScript sources (the tests run through tsx) the thread registers tsx's loader first.
  const tsx = import.meta.resolve('tsx/esm/api');
  const boot = `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(self.href)}); });`;
  const worker = new Worker(boot, { eval: true, workerData: job });
  return new Promise((resolve, reject) => {
    let settled = false;
    worker.once('message', (m: Reply) => {
      settled = true;
      if ('result' in m) resolve(m.result);
      else reject(new Error(m.error));
    });
    worker.once('error', (e) => {
      settled = true;
      reject(e);
    });
    worker.once('exit', (code) => {
      if (!settled)
        reject(new Error(`the power-loss thread for '${workload}' exited ${code} without a result`));
    });
  });
}

async function serve(job: Job['powerLossJob']): Promise<void> {
  const w = WORKLOADS.find((x) => x.name === job.workload);
  let reply: Reply;
  try {
    if (!w) throw new Error(`no power-loss workload named '${job.workload}'`);
    reply = { result: await runPowerLoss(job.dir, w, job.options) };
  } catch (e) {
    reply = { error: (e as Error).stack ?? String(e) };
  }
  parentPort!.postMessage(reply);
}

const job = isMainThread ? undefined : (workerData as Partial<Job> | null)?.powerLossJob;
if (job) void serve(job);
