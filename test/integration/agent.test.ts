/**
 * The agent end to end: a real agent process, real manifests on disk, real
 * FUSE mounts, every read from this (non-serving) process.
 */
import assert from 'node:assert/strict';
import {
  closeSync,
  mkdirSync,
  openSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { agentDir, logMatches, startAgent, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { mountsUnder, readExport } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, randomBytes, run, seededRandom } from '../helpers/tools.js';

const TOOLS = ['qemu-img', '/dev/fuse'];

interface Status {
  manifests: {
    file: string;
    name: string;
    valid: boolean;
    lastGoodInForce?: boolean;
    ignoredForHost?: string[];
    errors: { file: string; line: number | null; col: number | null; message: string }[];
  }[];
  exports: {
    id: string;
    state: string;
    reason: string;
    mountpoint: string;
    engine: string;
    node: string;
    manifest: string;
  }[];
}

function manifest(name: string, exports: string, extra = ''): string {
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n${extra}  exports:\n${exports}`;
}

/** An image with seeded content: raw file and its qcow2 conversion. */
function makeImage(
  dir: string,
  name: string,
  seed: number,
  size = 4 << 20,
): { qcow2: string; raw: string; data: Buffer } {
  const raw = join(dir, `${name}.ref`);
  const data = randomBytes(seededRandom(seed), size);
  writeFileSync(raw, data);
  const qcow2 = join(dir, `${name}.qcow2`);
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2);
  return { qcow2, raw, data };
}

function isMounted(path: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === path && l.includes('fuse.blkexport'));
}

describe('blkexport agent', { concurrency: false }, () => {
  test('refuses to start without --allow-root or --allow-any-path', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const r = run(BIN, ['agent', '--manifests', '/nonexistent', '--socket', '/tmp/x.sock'], {
      timeoutMs: 20_000,
    });
    assert.equal(r.status, 1);
    assert.match(r.stderr, /refusing to start without --allow-root/);
  });

  test('add, edit (reopen in place with an open descriptor), invalid YAML, delete', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const img = makeImage(d.images, 'disk', 11);
    const rawImg = join(d.images, 'plain.raw');
    writeFileSync(rawImg, randomBytes(seededRandom(12), 1 << 20));
    const agent = await startAgent(t, d);

    // Add: a qcow2 over itself, and a raw image with an explicit format, read-only.
    const file = join(d.manifests, 'disks.yaml');
    const exportsRO = shorthand('disk', img.qcow2) + shorthand('plain', rawImg, { format: 'raw' });
    writeFileSync(file, manifest('disks', exportsRO));
    await until('disk and plain ready', async () => {
      const s = await agent.get<Status>('/status');
      return s.exports.length === 2 && s.exports.every((e) => e.state === 'ready');
    });
    assert.deepEqual(readExport(img.qcow2), img.data);
    assert.equal(statSync(rawImg).mode & 0o777, 0o400);

    // Edit: writable → reopen in place. A descriptor opened before keeps reading; writes then land.
    const fd = openSync(rawImg, 'r');
    let fdOpen = true;
    t.after(() => {
      if (fdOpen) closeSync(fd);
    });
    const before = Buffer.alloc(16);
    readSync(fd, before, 0, 16, 0);
    writeFileSync(
      file,
      manifest(
        'disks',
        shorthand('disk', img.qcow2) + shorthand('plain', rawImg, { format: 'raw', writable: true }),
      ),
    );
    await until('plain writable', () => (statSync(rawImg).mode & 0o777) === 0o600);
    await logMatches(agent, /applied step="reopen-export" export="plain"/);
    assert.doesNotMatch(agent.log(), /remove-export.*plain/);
    const again = Buffer.alloc(16);
    readSync(fd, again, 0, 16, 0);
    assert.deepEqual(again, before);
    closeSync(fd);
    fdOpen = false;
    const wfd = openSync(rawImg, 'r+');
    writeSync(wfd, Buffer.from('written through the agent'), 0, 25, 4096);
    closeSync(wfd);

    // Invalid YAML: the export stays alive, the error shows in status with its position.
    writeFileSync(file, `${manifest('disks', exportsRO)}    - id: [broken\n`);
    const s = await until('the error in status', async () => {
      const st = await agent.get<Status>('/status');
      return st.manifests.find((m) => m.file === file && !m.valid) ? st : undefined;
    });
    const m = s.manifests.find((x) => x.file === file)!;
    assert.equal(m.lastGoodInForce, true);
    assert.ok(m.errors.length > 0);
    const brokenLine = manifest('disks', exportsRO).split('\n').length;
    assert.ok(
      m.errors.some((e) => e.line === brokenLine),
      JSON.stringify(m.errors),
    );
    assert.ok(isMounted(img.qcow2) && isMounted(rawImg));
    const st = run(BIN, ['status', '--socket', agent.socket, '-o', 'json']);
    assert.equal(st.status, 0, st.stderr);
    assert.equal(JSON.parse(st.stdout).manifests[0].valid, false);

    // Delete: everything is unmounted, and the write is in the image.
    rmSync(file);
    await until('unmounted', () => !isMounted(img.qcow2) && !isMounted(rawImg));
    assert.equal(
      readFileSync(rawImg)
        .subarray(4096, 4096 + 25)
        .toString(),
      'written through the agent',
    );
    assert.equal(run('qemu-img', ['check', img.qcow2]).status, 0);
  });

  test('a ConfigMap-style ..data symlink swap is picked up', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const a = makeImage(d.images, 'a', 21, 1 << 20);
    const b = makeImage(d.images, 'b', 22, 1 << 20);
    // Kubernetes layout: manifests/x.yaml -> ..data/x.yaml, ..data -> ..TS1
    const ts1 = join(d.manifests, '..2026_01');
    mkdirSync(ts1);
    writeFileSync(join(ts1, 'x.yaml'), manifest('cm', shorthand('a', a.qcow2)));
    symlinkSync('..2026_01', join(d.manifests, '..data'));
    symlinkSync('..data/x.yaml', join(d.manifests, 'x.yaml'));
    const agent = await startAgent(t, d);
    await until('a mounted', () => isMounted(a.qcow2));
    const ts2 = join(d.manifests, '..2026_02');
    mkdirSync(ts2);
    writeFileSync(join(ts2, 'x.yaml'), manifest('cm', shorthand('b', b.qcow2)));
    symlinkSync('..2026_02', join(d.manifests, '..data_tmp'));
    renameSync(join(d.manifests, '..data_tmp'), join(d.manifests, '..data'));
    rmSync(ts1, { recursive: true });
    await until('b mounted, a gone', () => isMounted(b.qcow2) && !isMounted(a.qcow2), 5000);
    // The mount appears before the pass that made it logs its outcome.
    await until('b reported ready', () => agent.log().includes('export ready export="b"'));
  });

  test('without connection keeping (as on kernels < 6.9) SIGKILL leaves a stale mount; a new agent cleans it and serves again; SIGTERM leaves nothing', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const img = makeImage(d.images, 'k', 31, 1 << 20);
    writeFileSync(join(d.manifests, 'k.yaml'), manifest('k', shorthand('k', img.qcow2)));
    const degraded = { BLKEXPORT_FUSE_RESEND: 'off' };
    const first = await startAgent(t, d, [], degraded);
    await until('k mounted', () => isMounted(img.qcow2));
    assert.match(first.log(), /native exports end with the agent process.*BLKEXPORT_FUSE_RESEND=off/);
    first.proc.kill('SIGKILL');
    await first.exited;
    const stale = run('stat', [img.qcow2]);
    assert.match(stale.stderr, /Transport endpoint is not connected|Software caused connection abort/);

    const second = await startAgent(t, d, [], degraded);
    await until('k served again', () => {
      try {
        return readExport(img.qcow2).equals(img.data);
      } catch {
        return false;
      }
    });
    assert.match(second.log(), /cleaned a stale mount of a previous agent/);
    second.proc.kill('SIGTERM');
    assert.equal(await second.exited, 0);
    assert.equal(mountsUnder(d.dir).length, 0);
  });

  test('drift is repaired: an export unmounted behind our back comes back, a replaced image is reopened', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const a = makeImage(d.images, 'r', 61, 1 << 20);
    const mnt = join(d.images, 'r.raw');
    writeFileSync(
      join(d.manifests, 'r.yaml'),
      manifest('r', shorthand('r', a.qcow2, { mountpoint: mnt, 'create-mountpoint': true })),
    );
    const agent = await startAgent(t, d);
    await until('r mounted', () => isMounted(mnt));
    assert.equal(run('umount', ['-l', mnt]).status, 0);
    await agent.post('/reconcile');
    await until('r mounted again', () => isMounted(mnt));
    await logMatches(agent, /applied step="repair-export" export="r"/);

    // Replace the image file (new inode) with different content: the next pass reopens it.
    const b = makeImage(d.dir, 'other', 62, 1 << 20);
    renameSync(b.qcow2, join(d.images, 'r.new'));
    renameSync(join(d.images, 'r.new'), a.qcow2);
    await agent.post('/reconcile');
    await until('new content served', () => readExport(mnt).equals(b.data));
    await logMatches(agent, /image changed under a live node; replacing/);
    const plan = run(BIN, ['plan', '--manifests', d.manifests, '--socket', agent.socket]);
    assert.equal(plan.status, 0, plan.stdout + plan.stderr);
  });

  test('a second export of an image already mounted over itself is added later from the same file', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const img = makeImage(d.images, 'self', 71, 2 << 20);
    const file = join(d.manifests, 's.yaml');
    writeFileSync(file, manifest('s', shorthand('whole', img.qcow2)));
    const agent = await startAgent(t, d);
    await until('whole mounted', () => isMounted(img.qcow2));
    const copy = join(d.images, 'copy.raw');
    writeFileSync(
      file,
      manifest(
        's',
        shorthand('whole', img.qcow2) +
          shorthand('copy', img.qcow2, { mountpoint: copy, 'create-mountpoint': true }),
      ),
    );
    await until('copy mounted', () => isMounted(copy));
    assert.ok(
      readExport(copy).equals(img.data),
      'the second export reads the qcow2, not the raw view over it',
    );
    const s = await agent.get<Status>('/status');
    assert.ok(s.exports.every((e) => e.state === 'ready'));
  });

  test('50 manifests at once, a collision on an id, and a manifest for another host', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const base = makeImage(d.images, 'base', 41, 1 << 20);
    for (let i = 0; i < 50; i++) {
      const mnt = join(d.images, `m${i}.raw`);
      writeFileSync(
        join(d.manifests, `m${String(i).padStart(2, '0')}.yaml`),
        manifest(`m${i}`, shorthand(`e${i}`, base.qcow2, { mountpoint: mnt, 'create-mountpoint': true })),
      );
    }
    // zz-dup.yaml sorts after m00.yaml and reuses its export id: refused as a whole.
    writeFileSync(
      join(d.manifests, 'zz-dup.yaml'),
      manifest(
        'dup',
        shorthand('e0', base.qcow2, { mountpoint: join(d.images, 'dup.raw'), 'create-mountpoint': true }),
      ),
    );
    writeFileSync(
      join(d.manifests, 'other-host.yaml'),
      manifest(
        'elsewhere',
        shorthand('far', base.qcow2, { mountpoint: join(d.images, 'far.raw'), 'create-mountpoint': true }),
        '  hosts: [some-other-host]\n',
      ),
    );
    const agent = await startAgent(t, d);
    const s = await until(
      '50 ready',
      async () => {
        const st = await agent.get<Status>('/status');
        return st.exports.filter((e) => e.state === 'ready').length === 50 ? st : undefined;
      },
      20_000,
    );
    assert.equal(s.exports.length, 50);
    assert.ok(readExport(join(d.images, 'm49.raw')).equals(base.data));
    const dup = s.manifests.find((m) => m.file.endsWith('zz-dup.yaml'))!;
    assert.equal(dup.valid, false);
    assert.match(dup.errors[0]!.message, /export id "e0" is already used by manifest "m0"/);
    const other = s.manifests.find((m) => m.file.endsWith('other-host.yaml'))!;
    assert.deepEqual(other.ignoredForHost, ['elsewhere']);
    assert.ok(!s.exports.some((e) => e.id === 'far'));
    assert.notEqual(hostname(), 'some-other-host');

    const metrics = await agent.get<string>('/metrics');
    assert.match(metrics, /blkexport_export_read_bytes_total\{export="e49"\} [1-9]/);
    assert.match(metrics, /blkexport_reconcile_passes_total\{result="ok"\} [1-9]/);
  });

  test('paths outside the allowed roots are refused; a failing export does not block the others', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const good = makeImage(d.images, 'good', 51, 1 << 20);
    const outside = join(d.dir, 'outside.raw');
    writeFileSync(outside, Buffer.alloc(1 << 20));
    symlinkSync(outside, join(d.images, 'link.raw'));
    const corrupt = join(d.images, 'corrupt.qcow2');
    qemuImg('create', '-f', 'qcow2', corrupt, '1M');
    const hdr = readFileSync(corrupt);
    hdr.writeUInt32BE(30, 20); // cluster_bits out of range
    writeFileSync(corrupt, hdr);
    writeFileSync(
      join(d.manifests, 'mixed.yaml'),
      manifest(
        'mixed',
        shorthand('good', good.qcow2) +
          shorthand('out', outside, { mountpoint: join(d.images, 'o.raw'), 'create-mountpoint': true }) +
          shorthand('link', join(d.images, 'link.raw'), {
            mountpoint: join(d.images, 'l.raw'),
            'create-mountpoint': true,
          }) +
          shorthand('bad', corrupt, { mountpoint: join(d.images, 'b.raw'), 'create-mountpoint': true }),
      ),
    );
    const agent = await startAgent(t, d);
    const s = await until('good ready and the rest failed', async () => {
      const st = await agent.get<Status>('/status');
      const by = new Map(st.exports.map((e) => [e.id, e]));
      return by.get('good')?.state === 'ready' &&
        ['out', 'link', 'bad'].every((id) => by.get(id)?.state === 'failed')
        ? by
        : undefined;
    });
    assert.match(s.get('out')!.reason, /outside the allowed roots/);
    assert.match(s.get('link')!.reason, /resolves to .*outside\.raw.*outside the allowed roots/);
    assert.match(s.get('bad')!.reason, /cluster/);
    assert.ok(readExport(good.qcow2).equals(good.data));
  });
});
