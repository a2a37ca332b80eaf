/**
 * Read-only views of internal qcow2 snapshots, compared byte for byte with
 * `qemu-img convert -l` on images qemu-img made: found by id first, then by
 * name; the view has the image's current size; writes refused; unknown names
 * listed. Then the same view through a real FUSE mount (`blkexport mount
 * --snapshot`) and through the agent (a shorthand with `snapshot:`), read from
 * child processes.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { openImage } from '../../src/block/index.js';
import { isBlkError } from '../../src/errors.js';
import { loadManifestText } from '../../src/manifest/load.js';
import { agentDir, startAgent, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { cleanupMountsUnder, mountsUnder, readExport } from '../helpers/mounts.js';
import {
  BIN,
  needTools,
  qemuImg,
  qemuIo,
  randomBytes,
  run,
  seededRandom,
  tempDir,
} from '../helpers/tools.js';

const M = 1024 * 1024;

/**
 * An image with two snapshots and a current state that differs from both:
 * snapshot id 1 "snap-a" (1 MiB, pattern 0x11 at 0), then grown to 3 MiB (v2: made at 3 MiB) and
 * overwritten; snapshot id 2 named "1" (so `1` by id and `1` by name differ).
 */
function makeImage(dir: string, name: string, createOpts: string[]): string {
  const img = join(dir, name);
  // qemu-img cannot resize a v2 image with snapshots: those start at the final size.
  const v2 = createOpts.some((o) => o.includes('compat=0.10'));
  qemuImg('create', '-q', '-f', 'qcow2', ...createOpts, img, v2 ? '3M' : '1M');
  qemuIo('-c', 'write -P 0x11 0 64k', '-c', 'write -P 0x12 960k 64k', img);
  qemuImg('snapshot', '-c', 'snap-a', img);
  if (!v2) qemuImg('resize', '-q', img, '3M');
  qemuIo('-c', 'write -P 0x22 0 64k', '-c', 'write -P 0x33 2M 64k', '-c', 'write -z 960k 64k', img);
  qemuImg('snapshot', '-c', '1', img);
  qemuIo('-c', 'write -P 0x44 0 4k', '-c', 'discard 2M 64k', img);
  return img;
}

/** What qemu-img shows for snapshot `which` (`-l`, id or name). */
function qemuView(img: string, which: string, out: string): Buffer {
  qemuImg('convert', '-l', which, '-O', 'raw', img, out);
  return readFileSync(out);
}

async function ourView(img: string, which: string): Promise<Buffer> {
  const o = await openImage({ filename: img, readOnly: true, snapshot: which });
  try {
    const buf = Buffer.alloc(o.node.length());
    await o.node.read(0, buf);
    return buf;
  } finally {
    await o.close();
  }
}

describe('qcow2 internal snapshot views', { concurrency: false }, () => {
  test('byte-identical to qemu-img convert -l: by id, by name, id before name; current size', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const variants: [string, string[]][] = [
      ['plain.qcow2', []],
      ['small-clusters.qcow2', ['-o', 'cluster_size=4k']],
      ['extl2.qcow2', ['-o', 'extended_l2=on,cluster_size=64k']],
      ['v2.qcow2', ['-o', 'compat=0.10']],
    ];
    for (const [name, opts] of variants) {
      const img = makeImage(dir, name, opts);
      for (const which of ['snap-a', '1', '2']) {
        const want = qemuView(img, which, join(dir, `${name}-${which}.raw`));
        const got = await ourView(img, which);
        assert.equal(got.length, 3 * M, `${name} ${which}: the view keeps the current virtual size`);
        assert.ok(got.equals(want), `${name} snapshot ${which} differs from qemu-img convert -l`);
      }
      // '1' is snapshot id 1 (snap-a), not the snapshot named "1".
      assert.equal((await ourView(img, '1'))[0], 0x11, name);
      assert.equal((await ourView(img, '2'))[0], 0x22, name);
    }
  });

  test('a snapshot of an overlay reads the backing file where the snapshot has no data', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const base = join(dir, 'base.raw');
    writeFileSync(base, randomBytes(seededRandom(7), 2 * M));
    const img = join(dir, 'overlay.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', img);
    qemuIo('-c', 'write -P 0x55 64k 64k', img);
    qemuImg('snapshot', '-c', 's', img);
    qemuIo('-c', 'write -P 0x66 0 1M', img);
    const want = qemuView(img, 's', join(dir, 's.raw'));
    assert.ok((await ourView(img, 's')).equals(want));
  });

  test('refusals: unknown names list what is there, writable views, non-qcow2 images', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t);
    const img = makeImage(dir, 'i.qcow2', []);
    await assert.rejects(ourView(img, 'nope'), (e: unknown) => {
      assert.ok(isBlkError(e));
      assert.match(
        e.message,
        /no internal snapshot with id or name "nope": the image has: id 1 name "snap-a", id 2 name "1"/,
      );
      return true;
    });
    await assert.rejects(openImage({ filename: img, readOnly: false, snapshot: 'snap-a' }), /is read-only/);
    const raw = join(dir, 'r.raw');
    writeFileSync(raw, Buffer.alloc(M));
    await assert.rejects(openImage({ filename: raw, readOnly: true, snapshot: 'x' }), /qcow2 feature/);
    const bare = join(dir, 'bare.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', bare, '1M');
    await assert.rejects(ourView(bare, 'x'), /the image has no internal snapshots/);
  });

  test('manifests: snapshot on a qcow2 node or a shorthand; writable over a view refused', () => {
    const head = 'apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: s\nspec:\n';
    const ok = loadManifestText(
      's.yaml',
      `${head}  exports:\n    - id: v\n      image: /srv/i.qcow2\n      snapshot: before-upgrade\n      mountpoint: /srv/v.raw\n`,
    );
    assert.deepEqual(ok.problems, []);
    assert.equal(
      ok.documents[0]!.nodes.find((n) => n.options['node-name'] === 'v-fmt')!.options.snapshot,
      'before-upgrade',
    );
    const writable = loadManifestText(
      's.yaml',
      `${head}  exports:\n    - id: v\n      image: /srv/i.qcow2\n      snapshot: s1\n      writable: true\n      format: qcow2\n      mountpoint: /srv/v.raw\n`,
    );
    assert.match(
      writable.problems.map((p) => p.message).join('\n'),
      /writable export "v" over node "v-fmt", a view of internal snapshot "s1": snapshot views are read-only/,
    );
    const raw = loadManifestText(
      's.yaml',
      `${head}  exports:\n    - id: v\n      image: /srv/i.img\n      snapshot: s1\n      format: raw\n      mountpoint: /srv/v.raw\n`,
    );
    assert.match(raw.problems.map((p) => p.message).join('\n'), /qcow2 feature/);
  });

  test('through FUSE: blkexport mount --snapshot, and an agent manifest with snapshot:', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io', '/dev/fuse')) return;
    const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
    const img = makeImage(dir, 'f.qcow2', []);
    const want = qemuView(img, 'snap-a', join(dir, 'want.raw'));
    const mnt = join(dir, 'view.raw');
    const m = run(BIN, ['mount', img, mnt, '--snapshot', 'snap-a', '--create-mountpoint', '--daemonize'], {
      timeoutMs: 30_000,
    });
    assert.equal(m.status, 0, m.stderr);
    assert.match(m.stdout, /at internal snapshot "snap-a" \(id 1\)/);
    assert.ok(readExport(mnt).equals(want));
    assert.notEqual(run('sh', ['-c', `printf x | dd of=${mnt} conv=notrunc status=none`]).status, 0);
    assert.equal(run(BIN, ['umount', mnt], { timeoutMs: 30_000 }).status, 0);
    assert.deepEqual(mountsUnder(dir), []);

    const d = agentDir(t);
    const img2 = makeImage(d.images, 'g.qcow2', []);
    const want2 = qemuView(img2, '2', join(d.images, 'want2.raw'));
    const mnt2 = join(d.images, 'g.raw');
    writeFileSync(
      join(d.manifests, 'g.yaml'),
      `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: g\nspec:\n  exports:\n${shorthand(
        'g',
        img2,
        {
          mountpoint: mnt2,
          'create-mountpoint': true,
          snapshot: "'2'",
        },
      )}`,
    );
    const agent = await startAgent(t, d);
    await until('g ready', async () => {
      const s = await agent.get<{ exports: { id: string; state: string }[] }>('/status');
      return s.exports.find((e) => e.id === 'g')?.state === 'ready';
    });
    assert.ok(readExport(mnt2).equals(want2));
  });
});
