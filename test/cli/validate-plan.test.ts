/**
 * `blkexport validate` and `blkexport plan` as a user runs them: a child
 * process, exit status, stdout and stderr. Runs the TypeScript sources through
 * tsx; the last test runs bin/blkexport when the build (npm run build) exists.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { test } from 'node:test';
import { BIN, REPO, type RunResult, run, tempDir } from '../helpers/tools.js';

const ENTRY =
  "import('./src/cli/main.ts').then((m) => m.main(process.argv.slice(1))).then((c) => { process.exitCode = c; })";

function blkexport(...args: string[]): RunResult {
  return run(process.execPath, ['--import', 'tsx', '-e', ENTRY, ...args], { cwd: REPO });
}

function assertNoStackTrace(r: RunResult): void {
  assert.doesNotMatch(r.stderr, /^\s+at .+:\d+:\d+\)?$/m, r.stderr);
}

const INVALID = 'test/fixtures/manifests/invalid';

test('validate: the examples are valid (exit 0)', () => {
  const r = blkexport('validate', 'manifests/examples');
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /manifests\/examples\/guest-disks\.yaml: ok \(guest-disks\)/);
  assert.match(r.stdout, /4 manifest file\(s\): 4 valid, 0 invalid/);
  assert.equal(r.stderr, '');
});

test('validate: pinpoints every invalid fixture as FILE:LINE:COL: message (exit 1)', () => {
  const r = blkexport('validate', INVALID, join(INVALID, 'collision'));
  assert.equal(r.status, 1);
  assertNoStackTrace(r);
  const names = readdirSync(join(REPO, INVALID)).filter((n) => n.endsWith('.yaml'));
  const files = [...names.map((n) => join(INVALID, n)), join(INVALID, 'collision', '20-second.yaml')];
  for (const file of files) {
    for (const m of readFileSync(join(REPO, file), 'utf8').matchAll(/^# expect: (\d+:\d+) (.+)$/gm)) {
      const line = r.stderr.split('\n').find((l) => l.startsWith(`${file}:${m[1]}: `));
      assert.ok(line, `no ${file}:${m[1]} in stderr:\n${r.stderr}`);
      assert.ok(line.includes(m[2]!), `${line} lacks ${m[2]}`);
    }
  }
  assert.match(r.stdout, /collision\/10-first\.yaml: ok/);
});

test('validate -o json: {manifests: [{file, name, valid, errors: [{file, line, col, message, path}]}]}', () => {
  const r = blkexport(
    'validate',
    '-o',
    'json',
    join(INVALID, '19-wrong-type-writable.yaml'),
    'manifests/examples/shorthand.yaml',
  );
  assert.equal(r.status, 1);
  const out = JSON.parse(r.stdout) as { manifests: Record<string, unknown>[] };
  assert.equal(out.manifests.length, 2);
  const [bad, good] = out.manifests;
  assert.equal(bad!.valid, false);
  assert.deepEqual(bad!.errors, [
    {
      file: join(INVALID, '19-wrong-type-writable.yaml'),
      line: 19,
      col: 17,
      message: 'expected a boolean (true or false), got string "yes"',
      path: '/spec/exports/0/writable',
      code: 'MANIFEST_SCHEMA',
    },
  ]);
  assert.deepEqual(good, {
    file: 'manifests/examples/shorthand.yaml',
    name: 'quick-look',
    documents: ['quick-look'],
    valid: true,
    errors: [],
  });
});

test('validate: usage errors and --help', () => {
  const none = blkexport('validate');
  assert.equal(none.status, 1);
  assert.match(none.stderr, /no PATH given/);
  const help = blkexport('validate', '--help');
  assert.equal(help.status, 0);
  assert.match(help.stdout, /^usage: blkexport validate /);
  const missing = blkexport('validate', '/nonexistent/manifests');
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /\/nonexistent\/manifests: cannot read: ENOENT/);
});

test('plan: the examples for hv-01 give the expected plan (exit 2)', () => {
  const r = blkexport('plan', '--manifests', 'manifests/examples', '--host', 'hv-01');
  assert.equal(r.status, 2, r.stderr);
  const lines = r.stdout.split('\n');
  for (const expected of [
    '+ node prot0 (file) /var/lib/blkexport/images/guest.qcow2 [native]',
    '+ node fmt0 (qcow2) file=prot0 [native]',
    '+ export exp0 (fuse) /var/lib/blkexport/images/guest.qcow2 writable (node fmt0) [native]',
    '+ node db-root-fmt (format auto, resolved when applied) file=db-root-file read-only [native]',
    '+ node db-root-part (partition) file=db-root-fmt number=1 (window read from the partition table) read-only [native]',
    '+ node disk0-p1 (raw) file=disk0 offset=1M size=1G read-only [native]',
    // A backing node stays read-only under a writable overlay.
    '+ node base0 (qcow2) file=base0-file backing=none read-only [native]',
    'Plan: 21 to add, 0 to change in place, 0 to replace, 0 to remove, 0 to repair.',
  ]) {
    assert.ok(lines.includes(expected), `missing line: ${expected}\n${r.stdout}`);
  }
  assert.ok(
    lines.indexOf('+ node prot0 (file) /var/lib/blkexport/images/guest.qcow2 [native]') <
      lines.indexOf('+ node fmt0 (qcow2) file=prot0 [native]'),
  );
  // The partition manifest is for hv-01 and hv-02 only.
  const other = blkexport('plan', '--manifests', 'manifests/examples', '--host', 'hv-09');
  assert.equal(other.status, 2);
  assert.doesNotMatch(other.stdout, /db-root/);
});

test('plan -o json: host, observed, manifests, changes, summary, steps', () => {
  const r = blkexport('plan', '--manifests', 'manifests/examples', '--host', 'hv-01', '-o', 'json');
  assert.equal(r.status, 2, r.stderr);
  const out = JSON.parse(r.stdout) as Record<string, unknown>;
  assert.deepEqual(Object.keys(out), ['host', 'observed', 'manifests', 'changes', 'summary', 'steps']);
  assert.equal(out.host, 'hv-01');
  assert.equal(out.changes, true);
  const steps = out.steps as {
    action: string;
    node?: Record<string, unknown>;
    origin?: Record<string, unknown>;
  }[];
  assert.equal(steps.length, 21);
  assert.deepEqual(steps[0], {
    engine: 'native',
    action: 'add-node',
    node: {
      'node-name': 'prot0',
      driver: 'file',
      'read-only': false,
      filename: '/var/lib/blkexport/images/guest.qcow2',
      locking: 'auto',
    },
    origin: {
      file: 'manifests/examples/guest-disks.yaml',
      line: 17,
      col: 7,
      path: '/spec/blockdevs/0',
      manifest: 'guest-disks',
    },
  });
});

test('plan: --socket with nothing listening says so and plans against nothing mounted', (t) => {
  const dir = tempDir(t);
  const r = blkexport('plan', '--manifests', 'manifests/examples', '--socket', join(dir, 'agent.sock'));
  assert.equal(r.status, 2);
  assert.match(r.stderr, /no agent answers on .*agent\.sock \(ENOENT\); assuming nothing is mounted/);
  assert.match(r.stdout, /^# host .*; observed: nothing mounted$/m);
});

for (const engine of ['native', 'qemu'] as const) {
  test(`plan: --socket uses the observed state the agent reports on GET /observed (default engine ${engine})`, async (t) => {
    const dir = tempDir(t);
    const socket = join(dir, 'agent.sock');
    const img = '/var/lib/blkexport/images/guest.qcow2';
    // The example without its `engine: native`: the agent's default engine serves it.
    const manifests = join(dir, 'manifests');
    mkdirSync(manifests);
    const example = readFileSync(join(REPO, 'manifests/examples/guest-disks.yaml'), 'utf8');
    writeFileSync(join(manifests, 'guest-disks.yaml'), example.replace(/^ {2}engine: native\n/m, ''));
    const observed = {
      nodes: [
        {
          options: {
            'node-name': 'prot0',
            driver: 'file',
            'read-only': false,
            filename: img,
            locking: 'auto',
          },
        },
        { options: { 'node-name': 'fmt0', driver: 'qcow2', 'read-only': false, file: 'prot0' } },
        {
          options: {
            'node-name': 'old0',
            driver: 'file',
            'read-only': true,
            filename: '/srv/old.raw',
            locking: 'auto',
          },
        },
      ],
      exports: [
        {
          state: 'mounted',
          options: {
            type: 'fuse',
            id: 'exp0',
            'node-name': 'fmt0',
            mountpoint: img,
            'create-mountpoint': false,
            writable: false,
            growable: false,
            'allow-other': 'auto',
          },
        },
      ],
      defaultEngine: engine,
    };
    for (const x of [...observed.nodes, ...observed.exports]) Object.assign(x, { engine });
    const paths: string[] = [];
    const server = createServer((req, res) => {
      paths.push(`${req.method} ${req.url}`);
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(observed));
    });
    t.after(() => server.close());
    await new Promise<void>((resolve) => server.listen(socket, resolve));
    // The server lives in this process, so the CLI must run asynchronously.
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', '-e', ENTRY, 'plan', '--manifests', manifests, '--socket', socket],
      {
        cwd: REPO,
      },
    );
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
    });
    child.stderr.on('data', (d) => {
      stderr += d;
    });
    const status = await new Promise<number | null>((resolve) => child.on('close', resolve));
    assert.equal(status, 2, stderr);
    assert.deepEqual(paths, ['GET /observed']);
    const lines = stdout.split('\n');
    assert.ok(lines.includes(`- node old0 [${engine}]`), stdout);
    // The native engine changes writable in place; the qemu engine remounts, and the plan says so.
    const writable =
      engine === 'native'
        ? '~ export exp0 writable: false → true (reopen in place) [native]'
        : '-/+ export exp0 (replace: writable changed; the qemu engine remounts to change it) [qemu]';
    assert.ok(lines.includes(writable), stdout);
    assert.doesNotMatch(stdout, /\+ (node prot0|node fmt0)/);
    assert.match(stdout, /observed: the agent on .*agent\.sock$/m);
  });
}

test('plan: an empty directory plans no changes (exit 0)', (t) => {
  const dir = tempDir(t);
  const r = blkexport('plan', '--manifests', dir);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /No changes\. The live state matches the manifests\./);
});

test('plan: an invalid manifest is reported with its position, left out, and makes the exit 1', (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'a.yaml'), readFileSync(join(REPO, 'manifests/examples/shorthand.yaml')));
  writeFileSync(join(dir, 'b.yaml'), readFileSync(join(REPO, INVALID, '19-wrong-type-writable.yaml')));
  const r = blkexport('plan', '--manifests', dir);
  assert.equal(r.status, 1);
  assertNoStackTrace(r);
  assert.match(
    r.stderr,
    /b\.yaml:19:17: expected a boolean \(true or false\), got string "yes" \(at \/spec\/exports\/0\/writable\)/,
  );
  assert.match(r.stderr, /b\.yaml is refused and left out of the plan/);
  assert.match(r.stdout, /\+ export web \(fuse\)/);
  assert.doesNotMatch(r.stdout, /exp0/);
});

test('plan: usage errors and --help', () => {
  const none = blkexport('plan');
  assert.equal(none.status, 1);
  assert.match(none.stderr, /--manifests DIR is required/);
  const bad = blkexport('plan', '--manifests', 'manifests/examples', '-o', 'yaml');
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /unknown output format 'yaml'/);
  const help = blkexport('plan', '--help');
  assert.equal(help.status, 0);
  assert.match(help.stdout, /^usage: blkexport plan --manifests DIR/);
  assert.match(help.stdout, /exit|Exit status/);
});

test('bin/blkexport validate and plan (the built CLI)', (t) => {
  if (!existsSync(join(REPO, 'dist', 'cli', 'commands', 'plan.js'))) {
    if (process.env.CI === 'true') assert.fail('dist/ is not built: npm test builds it first');
    t.skip('not built (npm run build)');
    return;
  }
  const v = run(BIN, ['validate', join(INVALID, '05-duplicate-key-top.yaml')], { cwd: REPO });
  assert.equal(v.status, 1);
  assert.equal(
    v.stderr.trim(),
    `${join(INVALID, '05-duplicate-key-top.yaml')}:14:1: Map keys must be unique`,
  );
  const p = run(BIN, ['plan', '--manifests', 'manifests/examples', '--host', 'hv-01'], { cwd: REPO });
  assert.equal(p.status, 2, p.stderr);
  assert.match(p.stdout, /^\+ export exp0 \(fuse\) \/var\/lib\/blkexport\/images\/guest\.qcow2 writable/m);
});
