/**
 * The qemu engine end to end with a real qemu-storage-daemon (QSD): exports
 * that outlive a SIGKILLed agent (same mount, empty plan), a QSD killed under
 * the agent and recovered, QEMU's own formats (vmdk, vhdx, vpc, vdi, qed)
 * and a read-matrix subset compared with `qemu-img convert`, backing-file
 * safety, and one agent serving both engines.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import {
  convertToRaw,
  killQsd,
  mountAt,
  QSD_TOOLS,
  qsdAgentSetup,
  qsdPid,
  readExport,
} from '../engine/qsd-helpers.js';
import { type AgentHandle, until } from '../helpers/agent.js';
import { shorthand } from '../helpers/manifests.js';
import { mountsUnder } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, qemuIo, randomBytes, run, seededRandom } from '../helpers/tools.js';

interface Status {
  exports: { id: string; engine: string; state: string; reason: string }[];
}

function manifest(name: string, body: string, engine?: string): string {
  const e = engine ? `  engine: ${engine}\n` : '';
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n${e}${body}`;
}

const setup = (t: Parameters<typeof qsdAgentSetup>[0]) => qsdAgentSetup(t, 'qemu');

/** A raw reference with seeded data in a few places (holes elsewhere). */
function reference(path: string, size: number, seed: number): Buffer {
  const data = Buffer.alloc(size);
  const rand = seededRandom(seed);
  for (let off = 0; off < size; off += size / 8) randomBytes(rand, 48 * 1024).copy(data, off);
  writeFileSync(path, data);
  return data;
}

async function allReady(agent: AgentHandle, n: number): Promise<Status> {
  return until(
    `${n} exports ready`,
    async () => {
      const st = await agent.get<Status>('/status');
      return st.exports.length === n && st.exports.every((e) => e.state === 'ready') ? st : undefined;
    },
    15_000,
  );
}

describe('the qemu engine', { concurrency: false }, () => {
  test('agent SIGKILL: QSD keeps serving; a new agent re-attaches (same mount, empty plan); QSD killed: recovered', async (t) => {
    if (!needTools(t, ...QSD_TOOLS)) return;
    const { d, qsdDir, start } = await setup(t);
    const ref = reference(join(d.images, 'k.ref'), 2 << 20, 201);
    const img = join(d.images, 'k.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', join(d.images, 'k.ref'), img);
    const mnt = join(d.images, 'k.raw');
    writeFileSync(
      join(d.manifests, 'k.yaml'),
      manifest('k', `  exports:\n${shorthand('k', img, { mountpoint: mnt, 'create-mountpoint': true })}`),
    );
    const first = await start();
    await allReady(first, 1);
    const pid = qsdPid(qsdDir)!;
    const mountId = mountAt(mnt)!.mountId;
    first.proc.kill('SIGKILL');
    await first.exited;
    // QSD keeps serving without the agent.
    assert.ok(readExport(mnt).equals(ref));

    const second = await start();
    await allReady(second, 1);
    assert.match(second.log(), /re-attached to qemu-storage-daemon/);
    assert.doesNotMatch(second.log(), /applied step=/, 'nothing re-applied');
    assert.equal(qsdPid(qsdDir), pid, 'the same daemon');
    assert.equal(mountAt(mnt)?.mountId, mountId, 'no remount');
    const plan = run(BIN, ['plan', '--manifests', d.manifests, '--socket', second.socket]);
    assert.equal(plan.status, 0, plan.stdout + plan.stderr);
    const st = run(BIN, ['status', '--socket', second.socket]);
    assert.match(st.stdout, /k\s+qemu\s+ready/);

    // QSD dies: the stale mount is cleaned, a new daemon serves the export again.
    killQsd(qsdDir);
    await until(
      'a new daemon serves k',
      () => {
        const p = qsdPid(qsdDir);
        return p !== undefined && p !== pid && mountAt(mnt)?.fstype === 'fuse' && readExport(mnt).equals(ref);
      },
      10_000,
    );
    assert.match(second.log(), /cleaned a stale mount of a dead qemu-storage-daemon/);

    second.proc.kill('SIGTERM');
    assert.equal(await second.exited, 0);
    assert.equal(qsdPid(qsdDir), undefined);
    assert.equal(mountsUnder(d.dir).length, 0);
  });

  test('vmdk, vhdx, vpc, vdi, qed made by qemu-img (auto and explicit) read like qemu-img convert', async (t) => {
    if (!needTools(t, ...QSD_TOOLS)) return;
    const { d, start } = await setup(t);
    const refPath = join(d.images, 'src.raw');
    reference(refPath, 4 << 20, 211);
    const cases: [string, string, string[]][] = [
      ['vmdk', 'vmdk', []],
      ['vmdks', 'vmdk', ['-o', 'subformat=streamOptimized']],
      ['vhdx', 'vhdx', []],
      ['vpc', 'vpc', []],
      ['vpcf', 'vpc', ['-o', 'subformat=fixed']],
      ['vdi', 'vdi', []],
      ['qed', 'qed', []],
    ];
    let body = '  exports:\n';
    for (const [id, fmt, opts] of cases) {
      const img = join(d.images, `${id}.img`);
      qemuImg('convert', '-f', 'raw', '-O', fmt, ...opts, refPath, img);
      const mp = { mountpoint: join(d.images, `${id}.raw`), 'create-mountpoint': true };
      body += shorthand(id, img, mp);
      // The same image with its format given explicitly.
      body += shorthand(`${id}-x`, img, { ...mp, mountpoint: join(d.images, `${id}-x.raw`), format: fmt });
    }
    writeFileSync(join(d.manifests, 'formats.yaml'), manifest('formats', body, 'qemu'));
    const agent = await start('native');
    await allReady(agent, cases.length * 2);
    for (const [id, fmt] of cases) {
      const want = convertToRaw(join(d.images, `${id}.img`), join(d.dir, `${id}.out`), fmt);
      // A fixed VHD has its footer at the end only: probed as raw, like QEMU's own probe does.
      if (id !== 'vpcf') assert.ok(readExport(join(d.images, `${id}.raw`)).equals(want), `${id} (auto)`);
      assert.ok(readExport(join(d.images, `${id}-x.raw`)).equals(want), `${id} (explicit)`);
    }
    const s = await agent.get<Status>('/status');
    assert.ok(s.exports.every((e) => e.engine === 'qemu'));
  });

  test('read matrix subset: qcow2 variants and backing chains through the qemu engine', async (t) => {
    if (!needTools(t, ...QSD_TOOLS, 'qemu-io')) return;
    const { d, start } = await setup(t);
    const refPath = join(d.images, 'src.raw');
    reference(refPath, 4 << 20, 221);
    const variants: [string, string[]][] = [
      ['v2', ['-o', 'compat=0.10']],
      ['c512', ['-o', 'cluster_size=512']],
      ['c2m', ['-o', 'cluster_size=2M']],
      ['zlib', ['-c']],
      ['zstd', ['-c', '-o', 'compression_type=zstd']],
      ['l2ext', ['-o', 'extended_l2=on,cluster_size=64k']],
      ['refc1', ['-o', 'refcount_bits=1']],
    ];
    let body = '  exports:\n';
    for (const [id, opts] of variants) {
      const img = join(d.images, `${id}.qcow2`);
      qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...opts, refPath, img);
      body += shorthand(id, img, { mountpoint: join(d.images, `${id}.raw`), 'create-mountpoint': true });
    }
    // Zero clusters and discards written by qemu-io.
    const z = join(d.images, 'zero.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', refPath, z);
    qemuIo('-f', 'qcow2', '-c', 'write -z 64k 128k', '-c', 'discard 1M 64k', z);
    body += shorthand('zero', z, { mountpoint: join(d.images, 'zero.raw'), 'create-mountpoint': true });
    // An overlay whose backing node the manifest names (long form).
    const base = join(d.images, 'base.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', refPath, base);
    const top = join(d.images, 'top.qcow2');
    qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    qemuIo('-f', 'qcow2', '-c', 'write -P 0x5a 1M 64k', top);
    const blockdevs = `  blockdevs:
    - { node-name: base-file, driver: file, filename: ${base}, read-only: true }
    - { node-name: base, driver: qcow2, file: base-file, backing: null, read-only: true }
    - { node-name: top-file, driver: file, filename: ${top}, read-only: true }
    - { node-name: top, driver: qcow2, file: top-file, backing: base, read-only: true }
`;
    body += `    - { id: chain, node-name: top, mountpoint: ${join(d.images, 'chain.raw')}, create-mountpoint: true }\n`;
    // A shorthand export of the same overlay: its backing file, inside the allowed roots, is opened
    // by us as explicit nodes (QEMU never follows it on its own).
    body += shorthand('follow', top, { mountpoint: join(d.images, 'follow.raw'), 'create-mountpoint': true });
    // An overlay whose backing file lies outside the allowed roots is refused.
    const outsideBase = join(d.dir, 'outside-base.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', refPath, outsideBase);
    const escapeTop = join(d.images, 'escape.qcow2');
    qemuImg('create', '-f', 'qcow2', '-b', outsideBase, '-F', 'qcow2', escapeTop);
    body += shorthand('escape', escapeTop, {
      mountpoint: join(d.images, 'escape.raw'),
      'create-mountpoint': true,
    });
    writeFileSync(join(d.manifests, 'matrix.yaml'), manifest('matrix', blockdevs + body, 'qemu'));
    const agent = await start();
    const by = await until(
      'every export settled',
      async () => {
        const st = await agent.get<Status>('/status');
        const m = new Map(st.exports.map((e) => [e.id, e]));
        return st.exports.length === variants.length + 4 &&
          m.get('escape')?.state === 'failed' &&
          st.exports.filter((e) => e.id !== 'escape').every((e) => e.state === 'ready')
          ? m
          : undefined;
      },
      15_000,
    );
    assert.match(by.get('escape')!.reason, /outside the allowed roots/);
    for (const id of [...variants.map((v) => v[0]), 'zero']) {
      const img = join(d.images, `${id === 'zero' ? 'zero' : id}.qcow2`);
      assert.ok(
        readExport(join(d.images, `${id}.raw`)).equals(convertToRaw(img, join(d.dir, `${id}.out`))),
        id,
      );
    }
    const chain = convertToRaw(top, join(d.dir, 'chain.out'));
    assert.ok(readExport(join(d.images, 'chain.raw')).equals(chain));
    assert.ok(readExport(join(d.images, 'follow.raw')).equals(chain), 'the followed chain reads the same');

    // Re-attach after SIGKILL: the chain's nodes are known (not removed as orphans), the plan is empty.
    agent.proc.kill('SIGKILL');
    await agent.exited;
    const again = await start();
    await until('re-attached', async () => (await again.get<Status>('/status')).exports.length > 0);
    const plan = run(BIN, ['plan', '--manifests', d.manifests, '--socket', again.socket, '-o', 'json']);
    const steps = (
      JSON.parse(plan.stdout) as { steps: { node?: { 'node-name': string }; export?: { id: string } }[] }
    ).steps;
    // Only the refused export (its format node and the export) is still to add.
    assert.deepEqual(
      steps.map((x) => x.node?.['node-name'] ?? x.export?.id),
      ['escape-fmt', 'escape'],
    );
    assert.doesNotMatch(again.log(), /removed a node qemu-storage-daemon had/);
    assert.ok(readExport(join(d.images, 'follow.raw')).equals(chain));
  });

  test('partition: of a qcow2 found by our reader, served by QSD as a raw window', async (t) => {
    if (!needTools(t, ...QSD_TOOLS, 'parted')) return;
    const { d, start } = await setup(t);
    const raw = join(d.images, 'disk.ref');
    const data = reference(raw, 8 << 20, 241);
    run('parted', [
      '-s',
      raw,
      'mklabel msdos',
      'mkpart primary ext4 2048s 8191s',
      'mkpart primary ext4 8192s 100%',
    ]);
    const img = join(d.images, 'disk.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, img);
    const whole = readFileSync(raw);
    const mnt = join(d.images, 'p2.raw');
    writeFileSync(
      join(d.manifests, 'p.yaml'),
      manifest(
        'p',
        `  exports:\n${shorthand('p2', img, { partition: 2, mountpoint: mnt, 'create-mountpoint': true })}`,
        'qemu',
      ),
    );
    const agent = await start();
    await allReady(agent, 1);
    assert.ok(readExport(mnt).equals(whole.subarray(8192 * 512)));
    assert.equal(data.length, whole.length);
    const plan = run(BIN, ['plan', '--manifests', d.manifests, '--socket', agent.socket]);
    assert.equal(plan.status, 0, plan.stdout + plan.stderr);
  });

  test('one agent, both engines: manifests pick theirs; a writable export of a format the native engine only reads fails clearly', async (t) => {
    if (!needTools(t, ...QSD_TOOLS)) return;
    const { d, qsdDir, start } = await setup(t);
    const refPath = join(d.images, 'src.raw');
    const ref = reference(refPath, 1 << 20, 231);
    const q = join(d.images, 'n.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', refPath, q);
    const v = join(d.images, 'v.vhdx');
    qemuImg('convert', '-f', 'raw', '-O', 'vhdx', refPath, v);
    const vm = join(d.images, 'nv.vmdk');
    qemuImg('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', refPath, vm);
    const mp = (n: string) => ({ mountpoint: join(d.images, n), 'create-mountpoint': true });
    writeFileSync(
      join(d.manifests, 'a-native.yaml'),
      manifest('nat', `  exports:\n${shorthand('n', q, mp('n.raw'))}${shorthand('nv', vm, mp('nv.raw'))}`),
    );
    writeFileSync(
      join(d.manifests, 'b-qemu.yaml'),
      manifest('qem', `  exports:\n${shorthand('q', q, mp('q.raw'))}`, 'qemu'),
    );
    writeFileSync(
      join(d.manifests, 'c-default.yaml'),
      manifest(
        'dflt',
        `  exports:\n${shorthand('v', v, { ...mp('v.raw'), format: 'vhdx', writable: true })}`,
      ),
    );
    const agent = await start('native');
    const by = await until('settled', async () => {
      const st = await agent.get<Status>('/status');
      const m = new Map(st.exports.map((e) => [e.id, e]));
      return m.get('n')?.state === 'ready' &&
        m.get('nv')?.state === 'ready' &&
        m.get('q')?.state === 'ready' &&
        m.get('v')?.state === 'failed'
        ? m
        : undefined;
    });
    assert.equal(by.get('n')!.engine, 'native');
    assert.equal(by.get('q')!.engine, 'qemu');
    assert.match(by.get('v')!.reason, /vhdx images are served read-only/);
    assert.equal(mountAt(join(d.images, 'n.raw'))?.fstype, 'fuse.blkexport');
    // vmdk (probed) is served by the native engine itself, read-only.
    assert.equal(by.get('nv')!.engine, 'native');
    assert.equal(mountAt(join(d.images, 'nv.raw'))?.fstype, 'fuse.blkexport');
    assert.ok(readExport(join(d.images, 'nv.raw')).equals(ref));
    assert.equal(mountAt(join(d.images, 'q.raw'))?.fstype, 'fuse');
    assert.ok(readExport(join(d.images, 'q.raw')).equals(ref));
    // Metrics name each export's engine; QSD 7.2 cannot count an export's requests (docs/engines.md).
    const metrics = (await agent.get<string>('/metrics')).split('\n');
    const info = (id: string) =>
      metrics.find((l) => l.startsWith('blkexport_export_info{') && l.includes(`export="${id}"`));
    assert.match(info('q') ?? '', /engine="qemu",type="fuse",counted="no"\} 1$/);
    assert.match(info('n') ?? '', /engine="native",type="fuse",counted="yes"\} 1$/);
    assert.ok(metrics.some((l) => l.startsWith('blkexport_export_read_ops_total{export="n"}')));
    assert.ok(!metrics.some((l) => l.startsWith('blkexport_export_read_ops_total{export="q"}')));

    // Moving a manifest to the other engine: removed from one, added to the other.
    writeFileSync(
      join(d.manifests, 'a-native.yaml'),
      manifest('nat', `  exports:\n${shorthand('n', q, mp('n.raw'))}`, 'qemu'),
    );
    await until('n served by QSD', () => mountAt(join(d.images, 'n.raw'))?.fstype === 'fuse');
    assert.ok(readExport(join(d.images, 'n.raw')).equals(ref));
    agent.proc.kill('SIGTERM');
    assert.equal(await agent.exited, 0);
    assert.equal(qsdPid(qsdDir), undefined);
    assert.equal(mountsUnder(d.dir).length, 0);
  });
});
