/**
 * qcow2 fuzzing in CI: seeded mutations of real qemu-img images (headers,
 * extensions, L1/L2, refcounts, snapshots, compressed descriptors), a fixed
 * number per run (the figures below, documented in docs/security.md); each
 * must be refused with a coded BlkError or served with coded read errors,
 * within the per-image bound, in bounded memory. A failing input is saved
 * under test/fixtures/fuzz/ (commit it: the replay test keeps it).
 *
 * The oracle: every read-only mutant blkexport serves is also converted by
 * `qemu-img convert -O raw` (its first MiB, qemu-oracle.ts); where qemu-img
 * converts it too, the bytes must be identical. The run asserts how many were
 * compared, so a fuzzer that quietly checks a tenth of that fails.
 * The read-write mutants are opened read-write and written, zeroed and
 * discarded; what succeeded must read back, and the run asserts how many
 * images had their writes read back. The seed varies per run (FUZZ_SEED to
 * repeat one); `npm run fuzz` runs longer. Every compressed cluster a served
 * image maps is also inflated by the FUSE binding's native decoder, which
 * must agree with JavaScript's wherever it accepts.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadFuse3 } from '../../src/export/fuse/fuse3.js';
import { needTools, REPO, tempDir } from '../helpers/tools.js';
import { runQcow2Fuzz, saveFailures } from './qcow2-run.js';

/** Mutants per run (docs/security.md quotes these and what a run compares). */
const READ_ONLY_IMAGES = 3000;
const READ_WRITE_IMAGES = 600;
/** Floors well under what a run does (40–60% compared, 25–36% read back): a tenth of either fails. */
const MIN_COMPARED = 600;
const MIN_READ_BACK = 50;
/** A cap, not the plan: a run cut short by it has fewer images than asked, and fails. */
const CAP_MS = 400_000;

test('qcow2 fuzzing: thousands of mutated images refused or served with coded errors, no crash or hang; served bytes equal qemu-img convert', {
  timeout: 2 * CAP_MS + 120_000,
}, async (t) => {
  if (!needTools(t, 'qemu-img', 'qemu-io')) return;
  const dir = tempDir(t, 'blkexport-fuzz-');
  const seed = Number(process.env.FUZZ_SEED ?? (Date.now() % 1_000_000) * 1000);
  const common = {
    corpusDir: dir,
    workers: 2,
    perImageMs: 5000,
    maxRss: 1536 * 1024 * 1024,
    budgetMs: CAP_MS,
  };
  const s = await runQcow2Fuzz({ ...common, seed, maxImages: READ_ONLY_IMAGES });
  const w = await runQcow2Fuzz({
    ...common,
    seed: seed + 500_000,
    maxImages: READ_WRITE_IMAGES,
    writes: true,
  });
  const failures = [...s.failures, ...w.failures];
  const saved = saveFailures(join(REPO, 'test/fixtures/fuzz'), failures);
  for (const [what, x] of [
    ['read-only', s],
    ['read-write', w],
  ] as const) {
    t.diagnostic(
      `${what}, seed ${seed}: ${x.images} images in ${x.elapsedMs} ms (${x.refused} refused, ${x.served} served, ` +
        `${x.servedWithReadErrors} with read errors, ${x.inflateCompared} compressed clusters also inflated natively; ` +
        `oracle: ${x.compared} compared with qemu-img convert, ${x.differed} differed, ${x.qemuRefused} refused by qemu-img, ${x.blkReadError} with blkexport read errors; ` +
        `${x.readBackImages} images' writes read back, ${x.readBackBytes} bytes), slowest ${Math.round(x.maxImageMs)} ms, ` +
        `peak RSS ${Math.round(x.peakRss / 2 ** 20)} MiB, codes ${JSON.stringify(x.codes)}`,
    );
  }
  assert.deepEqual(
    failures.map((f) => `${f.base} seed ${f.seed} [${f.steps.join('; ')}]: ${f.reason}`),
    [],
    `saved as fixtures: ${saved.join(', ')}`,
  );
  assert.ok(s.images >= READ_ONLY_IMAGES, `read-only mutants checked within ${CAP_MS} ms`);
  assert.ok(w.images >= READ_WRITE_IMAGES, `read-write mutants checked within ${CAP_MS} ms`);
  assert.equal(s.differed, 0);
  assert.ok(
    s.compared >= MIN_COMPARED,
    `only ${s.compared} mutants compared with qemu-img (at least ${MIN_COMPARED})`,
  );
  assert.ok(
    w.readBackImages >= MIN_READ_BACK,
    `only ${w.readBackImages} mutants' writes read back (at least ${MIN_READ_BACK})`,
  );
  assert.ok(
    s.refused > 0 && s.served > 0 && s.servedWithReadErrors > 0,
    'mutations reach open and read paths',
  );
  assert.ok(w.served > 0, 'mutations reach the write path');
  if (loadFuse3())
    assert.ok(s.inflateCompared > 0, "mutated compressed clusters reach the binding's decoder");
});
