/**
 * qcow2 fuzzing in CI: seeded mutations of real qemu-img images (headers,
 * extensions, L1/L2, refcounts, snapshots, compressed descriptors) for a fixed
 * time budget; each must be refused with a coded BlkError or served with
 * coded read errors, within the per-image bound, in bounded memory. A failing
 * input is saved under test/fixtures/fuzz/ (commit it: the replay test keeps it).
 * A third of the budget opens the mutants read-write and writes, zeroes and
 * discards too (no crash, no hang, coded errors). Whether what succeeded reads
 * back is checked by `npm run fuzz -- --writes` only, until the write path
 * passes it (see the todo fixtures of replay.test.ts). The seed varies per run
 * (FUZZ_SEED to repeat one); `npm run fuzz` runs longer. Every compressed
 * cluster a served image maps is also inflated by the FUSE binding's native
 * decoder, which must agree with JavaScript's wherever it accepts.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadFuse3 } from '../../src/export/fuse/fuse3.js';
import { needTools, REPO, tempDir } from '../helpers/tools.js';
import { runQcow2Fuzz, saveFailures } from './qcow2-run.js';

const BUDGET_MS = Number(process.env.BLKEXPORT_FUZZ_MS ?? 30_000);

test('qcow2 fuzzing: thousands of mutated images refused or served with coded errors, no crash or hang', {
  timeout: BUDGET_MS + 120_000,
}, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t, 'blkexport-fuzz-');
  const seed = Number(process.env.FUZZ_SEED ?? (Date.now() % 1_000_000) * 1000);
  const common = { corpusDir: dir, workers: 2, perImageMs: 5000, maxRss: 1536 * 1024 * 1024 };
  const s = await runQcow2Fuzz({ ...common, budgetMs: (BUDGET_MS * 2) / 3, seed });
  const w = await runQcow2Fuzz({
    ...common,
    budgetMs: BUDGET_MS / 3,
    seed: seed + 500_000,
    writes: true,
    readBack: false,
  });
  const failures = [...s.failures, ...w.failures];
  const saved = saveFailures(join(REPO, 'test/fixtures/fuzz'), failures);
  for (const [what, x] of [
    ['read-only', s],
    ['read-write', w],
  ] as const) {
    t.diagnostic(
      `${what}, seed ${seed}: ${x.images} images in ${x.elapsedMs} ms (${x.refused} refused, ${x.served} served, ` +
        `${x.servedWithReadErrors} with read errors, ${x.inflateCompared} compressed clusters also inflated natively), slowest ${Math.round(x.maxImageMs)} ms, ` +
        `peak RSS ${Math.round(x.peakRss / 2 ** 20)} MiB, codes ${JSON.stringify(x.codes)}`,
    );
  }
  assert.deepEqual(
    failures.map((f) => `${f.base} seed ${f.seed} [${f.steps.join('; ')}]: ${f.reason}`),
    [],
    `saved as fixtures: ${saved.join(', ')}`,
  );
  assert.ok(s.images + w.images >= 1000, `only ${s.images + w.images} images in ${BUDGET_MS} ms`);
  assert.ok(
    s.refused > 0 && s.served > 0 && s.servedWithReadErrors > 0,
    'mutations reach open and read paths',
  );
  assert.ok(w.served > 0, 'mutations reach the write path');
  if (loadFuse3())
    assert.ok(s.inflateCompared > 0, "mutated compressed clusters reach the binding's decoder");
});
