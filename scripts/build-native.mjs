#!/usr/bin/env node
// Builds native/ (blkexport's N-API helper: OFD byte-range locks, SO_PEERCRED)
// with node-gyp, offline: it points node-gyp at the headers of the running
// Node (e.g. /usr/include/node from the distribution package) so nothing is
// downloaded. Skips the build when the addon is newer than its sources.
// Usage: node scripts/build-native.mjs [--force]
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const dir = join(root, 'native');
const out = join(dir, 'build', 'Release', 'blkexport_native.node');
const sources = ['blkexport_native.c', 'binding.gyp'].map((f) => join(dir, f));

const force = process.argv.includes('--force');
if (!force && existsSync(out)) {
  const built = statSync(out).mtimeMs;
  if (sources.every((s) => statSync(s).mtimeMs <= built)) process.exit(0);
}

// node-gyp: the one npm bundles (npm exports its path to scripts), else next to this node.
const candidates = [
  process.env.npm_config_node_gyp,
  join(
    dirname(process.execPath),
    '..',
    'lib',
    'node_modules',
    'npm',
    'node_modules',
    'node-gyp',
    'bin',
    'node-gyp.js',
  ),
].filter((p) => typeof p === 'string' && existsSync(p));
if (candidates.length === 0) {
  console.error('build-native: node-gyp not found (it comes with npm); install npm or node-gyp');
  process.exit(1);
}
const args = [candidates[0], 'rebuild', '--directory', dir];

// Headers: an explicit nodedir wins, else the prefix of the running node when it ships its headers.
const prefix = join(dirname(process.execPath), '..');
const nodedir =
  process.env.npm_config_nodedir ||
  (existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? prefix : undefined);
if (nodedir) args.push(`--nodedir=${nodedir}`);

const r = spawnSync(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
if (r.status !== 0) {
  process.stderr.write(r.stdout + r.stderr);
  console.error(
    'build-native: node-gyp failed; it needs make, a C compiler and python3 (scripts/setup.sh installs them)',
  );
  process.exit(1);
}
