/**
 * `npm run fuzz -- --crash`: the power-loss check (test/block/crash/) for
 * longer than CI: every workload, seed after seed, with more random subsets
 * per sync point and qemu-img on more states, until the time is up.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runPowerLoss, summary } from '../block/crash/powerloss.js';
import { WORKLOADS } from '../block/crash/workloads.js';

/** Runs until `minutes` are up; returns true when no state failed. */
export async function runCrashFuzz(
  minutes: number,
  seedArg: string | undefined,
  random: number,
): Promise<boolean> {
  const deadline = Date.now() + minutes * 60_000;
  let seed = Number(seedArg ?? Date.now() % 1_000_000_000);
  let states = 0;
  let failures = 0;
  const started = Date.now();
  while (Date.now() < deadline) {
    for (const w of WORKLOADS) {
      if (Date.now() >= deadline) break;
      const dir = mkdtempSync(join(tmpdir(), 'blkexport-crash-fuzz-'));
      try {
        const r = await runPowerLoss(dir, w, { seed, qemuEvery: 3, continueEvery: 6, random });
        states += r.states;
        failures += r.failures.length;
        console.log(summary(r));
        for (const f of r.failures) console.log(`FAIL ${w.name} seed ${seed}: ${f}`);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
    seed++;
  }
  console.log(
    `crash: ${states} states in ${Math.round((Date.now() - started) / 1000)} s, ${failures} failures`,
  );
  return failures === 0;
}
