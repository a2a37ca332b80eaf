/**
 * Manifest fuzzing through the loader: thousands of mutated and random YAML
 * texts, each loaded without a throw, and every problem of an invalid one a
 * BlkError located at FILE:LINE:COL inside the text. Time-bounded per text
 * (alias bombs, deep nesting).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { loadManifestText } from '../../src/manifest/index.js';
import { seededRandom } from '../helpers/tools.js';
import { checkManifestText, saveManifestFailure } from './manifest-check.js';
import { seedManifestTexts } from './manifest-seeds.js';
import { mutateYaml, randomYaml } from './yaml-mutate.js';

const BUDGET_MS = Number(process.env.BLKEXPORT_FUZZ_MANIFEST_MS ?? 6000);

test('mutated and random manifests: never a throw, every problem located at FILE:LINE:COL', () => {
  const seeds = seedManifestTexts();
  const seed = Number(process.env.FUZZ_SEED ?? Date.now() % 1_000_000);
  const rand = seededRandom(seed);
  const deadline = Date.now() + BUDGET_MS;
  const failures: string[] = [];
  let n = 0;
  let valid = 0;
  for (let i = 0; Date.now() < deadline && failures.length < 10; i++, n++) {
    const s = seed * 100_000 + i;
    let text: string;
    let what: string;
    if (rand() < 0.15) {
      text = randomYaml(seededRandom(s), 800);
      what = `random text, seed ${s}`;
    } else {
      const base = seeds[Math.floor(rand() * seeds.length)]!;
      const m = mutateYaml(base, s);
      text = m.text;
      what = `mutation seed ${s}: ${m.steps.join('; ')}`;
    }
    const v = checkManifestText('fuzz.yaml', text);
    if (v) {
      const saved = saveManifestFailure(text, s, `${what}: ${v.split('\n')[0]}`);
      failures.push(`${what}\n  ${v}\n  saved as ${saved}`);
    } else if (loadManifestText('fuzz.yaml', text).valid) valid++;
  }
  console.log(`# manifest fuzz: seed ${seed}, ${n} texts (${valid} still valid) in ${BUDGET_MS} ms`);
  assert.deepEqual(failures, []);
  assert.ok(n >= 200, `only ${n} texts`);
});
