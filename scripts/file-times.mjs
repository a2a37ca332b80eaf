// A node:test reporter that sums the durations of each test file's top-level
// tests and prints the files slowest first: where the suite's time goes.
// Used by scripts/run-tests.mjs when BLKEXPORT_TEST_TIMES names an output file.
import { relative } from 'node:path';

export default async function* fileTimes(source) {
  const perFile = new Map();
  for await (const event of source) {
    if (event.type !== 'test:pass' && event.type !== 'test:fail') continue;
    if (event.data.nesting !== 0 || !event.data.file) continue;
    const file = relative(process.cwd(), event.data.file);
    perFile.set(file, (perFile.get(file) ?? 0) + event.data.details.duration_ms);
  }
  const rows = [...perFile].sort((a, b) => b[1] - a[1]);
  const total = rows.reduce((s, [, ms]) => s + ms, 0);
  yield `# seconds per test file (sum of top-level tests), ${(total / 1000).toFixed(0)} s in all\n`;
  for (const [file, ms] of rows) yield `${(ms / 1000).toFixed(1).padStart(7)}  ${file}\n`;
}
