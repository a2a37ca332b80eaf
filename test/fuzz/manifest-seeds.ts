/** The texts the manifest fuzzer mutates: every manifest fixture, the samples, and two YAML bombs. */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO } from '../helpers/tools.js';

/** Valid and invalid manifest fixtures, the repository's sample manifests, an alias bomb and deep nesting. */
export function seedManifestTexts(): string[] {
  const out: string[] = [];
  for (const d of [
    'test/fixtures/manifests/valid',
    'test/fixtures/manifests/valid/hosts-disjoint',
    'manifests',
  ]) {
    for (const f of readdirSync(join(REPO, d))) {
      if (f.endsWith('.yaml')) out.push(readFileSync(join(REPO, d, f), 'utf8'));
    }
  }
  const invalid = join(REPO, 'test/fixtures/manifests/invalid');
  for (const f of readdirSync(invalid))
    if (f.endsWith('.yaml')) out.push(readFileSync(join(invalid, f), 'utf8'));
  out.push(
    'a: &a [*a, *a]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b, *b]\n',
    `${'['.repeat(2000)}${']'.repeat(2000)}`,
  );
  return out;
}
