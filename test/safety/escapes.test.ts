/**
 * Escapes tried and refused (docs/security.md), through the agent and through
 * `blkexport mount`: an image or mountpoint outside the allowed roots (a
 * mountpoint only through a manifest: on the command line it is the user's), a
 * symlink inside pointing out (image, mountpoint, backing file), a backing
 * file named /etc/shadow, through `..`, as a json: specification, a data file
 * outside the roots. Each is refused with a reason, nothing gets mounted, and
 * the secret outside is never served.
 */
import assert from 'node:assert/strict';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { agentDir, startAgent, until } from '../helpers/agent.js';
import { cleanupMountsUnder, mountsUnder } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, run, tempDir } from '../helpers/tools.js';

const TOOLS = ['qemu-img', '/dev/fuse'];
const SECRET = 'SECRET-OUTSIDE-THE-ROOTS\n'.repeat(64);

interface Case {
  id: string;
  /** The image the export names (inside or outside the root). */
  image: string;
  /** Mountpoint (default: a fresh file inside the root). */
  mountpoint?: string;
  format?: string;
  /** What the refusal says. */
  reason: RegExp;
}

/** Builds the hostile layout: `root` (allowed) and `outside`, with every escape attempt inside `root`. */
function hostileLayout(root: string, outside: string): Case[] {
  mkdirSync(outside, { recursive: true });
  const secret = join(outside, 'secret.raw');
  writeFileSync(secret, SECRET);
  const good = join(root, 'good.raw');
  writeFileSync(good, Buffer.alloc(64 * 1024));
  symlinkSync(secret, join(root, 'link-out.raw'));
  symlinkSync(secret, join(root, 'backing-link.raw'));
  writeFileSync(join(outside, 'target'), 'not to be covered\n');
  writeFileSync(join(outside, 'm.raw'), '');
  symlinkSync(join(outside, 'target'), join(root, 'mnt-link'));
  const q = (name: string, ...args: string[]) => {
    const p = join(root, name);
    qemuImg('create', '-q', '-f', 'qcow2', ...args, p, '64K');
    return p;
  };
  const jsonName = `json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}`;
  return [
    { id: 'image-outside', image: secret, format: 'raw', reason: /outside the allowed roots/ },
    {
      id: 'image-link-out',
      image: join(root, 'link-out.raw'),
      format: 'raw',
      reason: /secret\.raw.*outside the allowed roots/,
    },
    {
      id: 'mnt-outside',
      image: good,
      format: 'raw',
      mountpoint: join(outside, 'm.raw'),
      reason: /outside the allowed roots/,
    },
    {
      id: 'mnt-link-out',
      image: good,
      format: 'raw',
      mountpoint: join(root, 'mnt-link'),
      reason: /outside the allowed roots/,
    },
    {
      id: 'backing-shadow',
      image: q('shadow.qcow2', '-u', '-b', '/etc/shadow', '-F', 'raw'),
      reason: /backing file '\/etc\/shadow' refused: .*outside the allowed roots/,
    },
    {
      id: 'backing-dotdot',
      image: q('dotdot.qcow2', '-u', '-b', '../outside/secret.raw', '-F', 'raw'),
      reason: /backing file '\.\.\/outside\/secret\.raw' refused: .*outside the allowed roots/,
    },
    {
      id: 'backing-link',
      image: q('blink.qcow2', '-u', '-b', 'backing-link.raw', '-F', 'raw'),
      reason: /backing file 'backing-link\.raw' refused: .*secret\.raw is outside the allowed roots/,
    },
    {
      id: 'backing-json',
      image: q('json.qcow2', '-u', '-b', jsonName, '-F', 'raw'),
      reason: /json: specifications are never followed/,
    },
    {
      id: 'backing-protocol',
      image: q('nbd.qcow2', '-u', '-b', 'nbd:localhost:10809', '-F', 'raw'),
      reason: /protocol prefixes are not followed/,
    },
    {
      id: 'data-file-outside',
      image: q('data.qcow2', '-o', `data_file=${join(outside, 'data.raw')}`),
      reason: /data file '.*data\.raw' refused: .*outside the allowed roots/,
    },
  ];
}

describe('escapes are refused', { concurrency: false }, () => {
  test('through the agent: every escape is a failed export with its reason; the good sibling serves', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const outside = join(d.dir, 'outside');
    const cases = hostileLayout(d.images, outside);
    let exports = '';
    for (const c of cases) {
      exports += `    - id: ${c.id}\n      image: '${c.image}'\n`;
      exports += `      mountpoint: '${c.mountpoint ?? join(d.images, `${c.id}.mnt`)}'\n`;
      if (!c.mountpoint) exports += '      create-mountpoint: true\n';
      if (c.format) exports += `      format: ${c.format}\n`;
    }
    exports += `    - id: good\n      image: ${join(d.images, 'good.raw')}\n      format: raw\n      mountpoint: ${join(d.images, 'good.mnt')}\n      create-mountpoint: true\n`;
    writeFileSync(
      join(d.manifests, 'escapes.yaml'),
      `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: escapes\nspec:\n  exports:\n${exports}`,
    );
    const agent = await startAgent(t, d);
    const by = await until(
      'good ready, every escape failed',
      async () => {
        const s = await agent.get<{ exports: { id: string; state: string; reason: string }[] }>('/status');
        const m = new Map(s.exports.map((e) => [e.id, e]));
        return m.get('good')?.state === 'ready' && cases.every((c) => m.get(c.id)?.state === 'failed')
          ? m
          : undefined;
      },
      15_000,
    );
    for (const c of cases) assert.match(by.get(c.id)!.reason, c.reason, c.id);
    const mounted = mountsUnder(d.dir).map((m) => m.mountpoint);
    assert.deepEqual(mounted, [join(d.images, 'good.mnt')]);
    assert.equal(run('cat', [join(outside, 'target')]).stdout, 'not to be covered\n');
  });

  test('through blkexport mount --allow-root: every escape exits 1 with its reason and mounts nothing', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = tempDir(t, 'blkexport-escape-', cleanupMountsUnder);
    const root = join(dir, 'root');
    mkdirSync(root);
    const cases = hostileLayout(root, join(dir, 'outside'));
    for (const c of cases) {
      // A mountpoint typed on the command line is the user's choice, not an escape: see the next test.
      if (c.mountpoint) continue;
      const mnt = join(root, `${c.id}.mnt`);
      writeFileSync(mnt, '');
      const args = ['mount', c.image, mnt, '--allow-root', root, '--daemonize'];
      if (c.format) args.push('--format', c.format);
      const r = run(BIN, args, { timeoutMs: 30_000 });
      assert.equal(r.status, 1, `${c.id}: exit ${r.status}: ${r.stderr}`);
      assert.match(r.stderr, c.reason, c.id);
      assert.deepEqual(mountsUnder(dir), [], `${c.id} mounted something`);
    }
  });

  test('blkexport mount takes a mountpoint outside the roots when the user names it', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = tempDir(t, 'blkexport-escape-', cleanupMountsUnder);
    const root = join(dir, 'root');
    mkdirSync(root);
    const cases = hostileLayout(root, join(dir, 'outside')).filter((c) => c.mountpoint);
    assert.equal(cases.length, 2);
    for (const c of cases) {
      const mnt = c.mountpoint as string;
      const r = run(BIN, ['mount', c.image, mnt, '--format', 'raw', '--daemonize'], { timeoutMs: 30_000 });
      assert.equal(r.status, 0, `${c.id}: exit ${r.status}: ${r.stderr}`);
      assert.equal(mountsUnder(dir).length, 1, c.id);
      const u = run(BIN, ['umount', mnt], { timeoutMs: 30_000 });
      assert.equal(u.status, 0, `${c.id}: ${u.stderr}`);
      assert.deepEqual(mountsUnder(dir), [], c.id);
    }
  });
});
