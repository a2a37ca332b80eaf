#!/usr/bin/env node
// The import boundaries of src/, checked on every `npm test`: folders are
// layers that depend one way (docs/architecture.md), and the reconciler's
// core stays pure (no node: module, so no I/O and no clock reach it).
// Usage: node scripts/check-layers.mjs [SRC_DIR]   exit 1 and one line per violation
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';

/** layer → the layers it may import (besides itself). Files at src/ top level are layer "top". */
const ALLOWED = {
  top: [],
  block: ['top'],
  manifest: ['top'],
  reconcile: ['manifest', 'top'],
  export: ['block', 'top'],
  engine: ['export', 'block', 'reconcile', 'manifest', 'top'],
  agent: ['engine', 'export', 'block', 'reconcile', 'manifest', 'top'],
  cli: ['agent', 'engine', 'export', 'block', 'reconcile', 'manifest', 'top'],
};
/** Layers that may not import any node: module (pure functions of their inputs). */
const PURE = new Set(['reconcile']);

const src = resolve(process.argv[2] ?? join(dirname(new URL(import.meta.url).pathname), '..', 'src'));

function files(dir) {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) return files(p);
    return p.endsWith('.ts') ? [p] : [];
  });
}

function layerOf(file) {
  const parts = relative(src, file).split('/');
  return parts.length === 1 ? 'top' : parts[0];
}

const problems = [];
for (const file of files(src)) {
  const layer = layerOf(file);
  if (!(layer in ALLOWED)) {
    problems.push(
      `${relative(src, file)}: folder '${layer}' is not a known layer (add it to scripts/check-layers.mjs)`,
    );
    continue;
  }
  const text = readFileSync(file, 'utf8');
  const specs = [
    ...text.matchAll(/(?:^|\n)\s*(?:import|export)[^'";]*?from\s*'([^']+)'|import\(\s*'([^']+)'\s*\)/g),
  ];
  for (const m of specs) {
    const spec = m[1] ?? m[2];
    if (spec.startsWith('node:')) {
      if (PURE.has(layer)) problems.push(`${relative(src, file)}: imports ${spec}, but ${layer}/ is pure`);
      continue;
    }
    if (!spec.startsWith('.')) continue;
    const target = resolve(dirname(file), spec);
    const to = layerOf(target);
    if (to !== layer && !ALLOWED[layer].includes(to))
      problems.push(
        `${relative(src, file)}: imports ${relative(src, target)} (${layer}/ may not depend on ${to === 'top' ? 'src/' : `${to}/`})`,
      );
  }
}
for (const p of problems) console.error(`check-layers: ${p}`);
if (problems.length) process.exit(1);
console.log(`check-layers: ${files(src).length} files, layers respected`);
