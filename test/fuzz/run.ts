/**
 * `npm run fuzz`: the long fuzzing run. qcow2 images for most of the budget,
 * then manifests; every failing input is saved under test/fixtures/fuzz/ for
 * the replay test. Exits 1 when anything failed.
 *   npm run fuzz -- [--minutes N (10)] [--seed S] [--workers W (2)] [--manifests-only | --qcow2-only]
 *                   [--writes]   (qcow2 mutants opened read-write: writes, zeroes, discards, read-back)
 *   npm run fuzz -- --crash [--minutes N] [--seed S] [--random R (6)]
 *                   (power loss only: every workload of test/block/crash/workloads.ts, seed after seed,
 *                    R random subsets per sync point, qemu-img on every 3rd state; see docs/qcow2.md)
 * Read-only qcow2 mutants that blkexport serves are compared with `qemu-img convert` (qemu-oracle.ts).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { loadManifestText } from '../../src/manifest/index.js';
import { REPO, seededRandom } from '../helpers/tools.js';
import { checkManifestText, saveManifestFailure } from './manifest-check.js';
import { seedManifestTexts } from './manifest-seeds.js';
import { runQcow2Fuzz, saveFailures } from './qcow2-run.js';
import { mutateYaml, randomYaml } from './yaml-mutate.js';

const { values } = parseArgs({
  options: {
    minutes: { type: 'string', default: '10' },
    seed: { type: 'string' },
    workers: { type: 'string', default: '2' },
    'manifests-only': { type: 'boolean', default: false },
    'qcow2-only': { type: 'boolean', default: false },
    writes: { type: 'boolean', default: false },
    crash: { type: 'boolean', default: false },
    random: { type: 'string', default: '6' },
  },
});
if (values.crash) {
  const { runCrashFuzz } = await import('./crash-run.js');
  process.exit((await runCrashFuzz(Number(values.minutes), values.seed, Number(values.random))) ? 0 : 1);
}
const budget = Number(values.minutes) * 60_000;
const seed = Number(values.seed ?? Date.now() % 1_000_000_000);
const manifestShare = values['manifests-only'] ? 1 : values['qcow2-only'] ? 0 : 0.15;
let failed = 0;

if (manifestShare < 1) {
  const dir = mkdtempSync(join(tmpdir(), 'blkexport-fuzz-'));
  try {
    const s = await runQcow2Fuzz({
      corpusDir: dir,
      budgetMs: budget * (1 - manifestShare),
      seed,
      workers: Number(values.workers),
      perImageMs: 5000,
      maxRss: 2 * 1024 ** 3,
      writes: values.writes,
    });
    const saved = saveFailures(join(REPO, 'test/fixtures/fuzz'), s.failures);
    console.log(
      `qcow2: seed ${seed}, ${s.images} images in ${s.elapsedMs} ms: ${s.refused} refused, ${s.served} served ` +
        `(${s.servedWithReadErrors} with read errors); oracle: ${s.compared} compared with qemu-img convert, ` +
        `${s.differed} differed, ${s.qemuRefused} refused by qemu-img, ${s.blkReadError} with blkexport read errors; ` +
        `slowest ${Math.round(s.maxImageMs)} ms; ` +
        `peak RSS ${Math.round(s.peakRss / 2 ** 20)} MiB; codes ${JSON.stringify(s.codes)}`,
    );
    for (const f of s.failures)
      console.log(`FAIL ${f.base} seed ${f.seed} [${f.steps.join('; ')}]: ${f.reason}`);
    if (saved.length) console.log(`saved: ${saved.join(', ')} (commit them)`);
    failed += s.failures.length;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (manifestShare > 0) {
  const texts = seedManifestTexts();
  const rand = seededRandom(seed);
  const deadline = Date.now() + budget * manifestShare;
  let n = 0;
  let valid = 0;
  for (let i = 0; Date.now() < deadline; i++, n++) {
    const s = seed * 100_000 + i;
    const m =
      rand() < 0.15
        ? { text: randomYaml(seededRandom(s), 800), steps: ['random text'] }
        : mutateYaml(texts[Math.floor(rand() * texts.length)]!, s);
    const v = checkManifestText('fuzz.yaml', m.text);
    if (v) {
      failed++;
      const path = saveManifestFailure(m.text, s, `${m.steps.join('; ')}: ${v.split('\n')[0]}`);
      console.log(`FAIL manifest seed ${s} [${m.steps.join('; ')}]: ${v}\nsaved: ${path}`);
    } else if (loadManifestText('fuzz.yaml', m.text).valid) valid++;
  }
  console.log(`manifests: seed ${seed}, ${n} texts (${valid} still valid)`);
}
process.exit(failed ? 1 : 0);
