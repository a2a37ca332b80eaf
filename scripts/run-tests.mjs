#!/usr/bin/env node
// Runs every test/**/*.test.ts with Node's built-in runner through tsx.
// (On Node 20, `node --test test/` finds no .ts file and reports "tests 0".)
// Usage: node scripts/run-tests.mjs [substring-filter...]
import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';

const root = new URL('..', import.meta.url).pathname;

function collect(dir) {
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (name === 'fixtures' || name === 'node_modules') continue;
    if (statSync(p).isDirectory()) out.push(...collect(p));
    else if (name.endsWith('.test.ts')) out.push(relative(root, p));
  }
  return out;
}

const filters = process.argv.slice(2);
let files = collect(join(root, 'test'));
if (filters.length) files = files.filter((f) => filters.some((x) => f.includes(x)));
if (files.length === 0) {
  console.error('run-tests: no test files found');
  process.exit(1);
}
// BLKEXPORT_TEST_TIMES=FILE also writes the seconds each test file took (scripts/file-times.mjs).
const times = process.env.BLKEXPORT_TEST_TIMES
  ? [
      '--test-reporter-destination=stdout',
      '--test-reporter=./scripts/file-times.mjs',
      `--test-reporter-destination=${process.env.BLKEXPORT_TEST_TIMES}`,
    ]
  : [];
const r = spawnSync(
  process.execPath,
  ['--import', 'tsx', '--test', '--test-reporter=spec', ...times, ...files],
  {
    cwd: root,
    stdio: 'inherit',
  },
);
process.exit(r.status ?? 1);
