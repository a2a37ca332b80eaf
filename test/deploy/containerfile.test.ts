/**
 * The Containerfile, checked without a container builder (none can pull a base
 * image on this machine: only the npm and Debian registries are reachable).
 * The final stage installs every shared library the built addons link (found
 * with ldd and dpkg, so a new dynamic dependency fails here), carries every file
 * the code loads at run time, and has no compilers; the image tag the
 * DaemonSet runs is the package's version.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { needTools, REPO, run, runOk } from '../helpers/tools.js';

interface Stage {
  from: string;
  lines: string[];
}

function stages(text: string): Stage[] {
  // Join continuation lines, drop comments.
  const logical = text
    .replace(/\\\n/g, ' ')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  const out: Stage[] = [];
  for (const l of logical) {
    if (/^FROM\s/i.test(l)) out.push({ from: l, lines: [] });
    else out.at(-1)?.lines.push(l);
  }
  return out;
}

function aptPackages(stage: Stage): string[] {
  return stage.lines
    .filter((l) => l.includes('apt-get install'))
    .flatMap((l) => l.split(/\s+/))
    .filter(
      (w) =>
        /^[a-z0-9][a-z0-9+.-]+$/.test(w) &&
        !['run', 'apt-get', 'install', 'update', 'rm', 'debian_frontend=noninteractive'].includes(
          w.toLowerCase(),
        ),
    );
}

/** The Debian package that ships `path` (merged /usr: the database may name either spelling). */
function debianPackageOf(path: string): string {
  const alt = path.startsWith('/usr/') ? path.slice(4) : `/usr${path}`;
  for (const p of [path, alt]) {
    const r = run('dpkg', ['-S', p]);
    if (r.status === 0) return r.stdout.split(':')[0]!;
  }
  throw new Error(`no Debian package ships ${path}`);
}

const ADDONS = [
  'native/build/Release/blkexport_native.node',
  'native-fuse/build/Release/blkexport_fuse3.node',
];

test('Containerfile: the runtime stage has every library the addons link, every file the code loads, no compilers', (t) => {
  if (!needTools(t, 'ldd', 'dpkg')) return;
  const all = stages(readFileSync(join(REPO, 'Containerfile'), 'utf8'));
  assert.equal(all.length, 2, 'a build stage and a runtime stage');
  const [build, final] = all as [Stage, Stage];
  assert.match(build.from, /AS build/i);
  const runtime = aptPackages(final);
  for (const p of runtime)
    assert.doesNotMatch(
      p,
      /-dev$|^build-essential$|^gcc|^g\+\+|^make$|^python3$/,
      `compiler or headers in the final stage: ${p}`,
    );

  // Shared libraries of the built addons -> the Debian packages that ship them.
  const needed = new Set<string>();
  for (const addon of ADDONS) {
    for (const line of runOk('ldd', [join(REPO, addon)]).split('\n')) {
      const m = /=>\s+(\S+)/.exec(line);
      if (!m) continue;
      const owner = debianPackageOf(m[1]!);
      if (owner !== 'libc6') needed.add(owner);
    }
  }
  assert.ok(needed.has('libfuse3-3'), [...needed].join(', '));
  for (const p of needed) assert.ok(runtime.includes(p), `the runtime stage lacks ${p} (linked by an addon)`);

  // What the code loads at run time is copied into the final stage.
  const copies = final.lines.filter((l) => l.startsWith('COPY')).join('\n');
  for (const path of ['dist', 'bin', 'schema', 'node_modules', 'package.json', ...ADDONS]) {
    assert.ok(copies.includes(`/opt/blkexport/${path}`), `the runtime stage does not copy ${path}`);
  }
  assert.match(final.lines.join('\n'), /ENTRYPOINT \["\/opt\/blkexport\/bin\/blkexport"\]/);
});

test('the DaemonSet runs the image tag of this version', () => {
  const version = (JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as { version: string })
    .version;
  const ds = readFileSync(join(REPO, 'deploy/kubernetes/base/daemonset.yaml'), 'utf8');
  const images = [...ds.matchAll(/image:\s*(\S+)/g)].map((m) => m[1]);
  assert.ok(images.length >= 2);
  for (const i of images) assert.equal(i, `registry.example/blkexport:${version}`);
  assert.ok(
    readFileSync(join(REPO, 'Containerfile'), 'utf8').includes(`registry.example/blkexport:${version}`),
  );
});
