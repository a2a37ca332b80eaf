#!/usr/bin/env node
// Builds the N-API addons with node-gyp, offline: it points node-gyp at the
// headers of the running Node (e.g. /usr/include/node from the distribution
// package) so nothing is downloaded. Skips an addon newer than its sources.
//   native/       OFD byte-range locks, SO_PEERCRED (required)
//   native-fuse/  the libfuse 3 FUSE binding (optional: needs libfuse3-dev, zlib1g-dev
//                 and libzstd-dev; without them exports fall back to fuse-native, libfuse 2)
// Usage: node scripts/build-native.mjs [--force]
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const addons = [
  {
    dir: join(root, 'native'),
    out: 'blkexport_native.node',
    required: true,
  },
  {
    dir: join(root, 'native-fuse'),
    out: 'blkexport_fuse3.node',
    required: false,
    // Built only where Debian's libfuse3-dev, zlib1g-dev and libzstd-dev are installed
    // (zlib and zstd inflate compressed qcow2 clusters in the workers).
    needs: ['/usr/include/fuse3/fuse_lowlevel.h', '/usr/include/zlib.h', '/usr/include/zstd.h'],
  },
];

const force = process.argv.includes('--force');
// An addon's sources: binding.gyp and every C source or header next to it.
const sources = (dir) => readdirSync(dir).filter((f) => f === 'binding.gyp' || /\.[ch]$/.test(f));
const upToDate = (a) => {
  const out = join(a.dir, 'build', 'Release', a.out);
  if (force || !existsSync(out)) return false;
  const built = statSync(out).mtimeMs;
  return sources(a.dir).every((s) => statSync(join(a.dir, s)).mtimeMs <= built);
};
const todo = addons.filter((a) => !upToDate(a));
if (todo.length === 0) process.exit(0);

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
// Headers: an explicit nodedir wins, else the prefix of the running node when it ships its headers.
const prefix = join(dirname(process.execPath), '..');
const nodedir =
  process.env.npm_config_nodedir ||
  (existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? prefix : undefined);

let failed = false;
for (const a of todo) {
  const lacking = (a.needs ?? []).filter((p) => !existsSync(p));
  if (lacking.length > 0) {
    console.error(
      `build-native: skipping ${a.dir} (${lacking.join(', ')} missing: apt-get install libfuse3-dev zlib1g-dev libzstd-dev); using fuse-native`,
    );
    continue;
  }
  const args = [candidates[0], 'rebuild', '--directory', a.dir];
  if (nodedir) args.push(`--nodedir=${nodedir}`);
  const r = spawnSync(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
  if (r.status !== 0) {
    process.stderr.write(r.stdout + r.stderr);
    console.error(
      `build-native: node-gyp failed in ${a.dir}; it needs make, a C compiler and python3 (scripts/setup.sh installs them)`,
    );
    if (a.required) failed = true;
  }
}
process.exit(failed ? 1 : 0);
