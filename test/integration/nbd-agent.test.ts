/**
 * `type: nbd` exports served by a real agent process on its host-level NBD
 * server, read and written by real clients (qemu-img, qemu-io, nbdinfo from
 * Debian's qemu-utils and libnbd-bin): bytes equal to `qemu-img convert`,
 * exports listed with their descriptions, added and removed live as
 * manifests change (a removed export's connected client is closed, new
 * clients cannot open it), a FUSE and an NBD export sharing one node,
 * writes that leave a clean image equal to the same writes done by qemu-io
 * on a copy, connection counts in status and /metrics, plain TCP refused.
 */
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { type AddressInfo, createServer } from 'node:net';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { qsdAgentSetup } from '../engine/qsd-helpers.js';
import { agentDir, startAgent, until } from '../helpers/agent.js';
import { readExport } from '../helpers/mounts.js';
import { RawClient, sh } from '../helpers/nbd.js';
import { BIN, needTools, qemuImg, qemuIo, run, tempDir } from '../helpers/tools.js';

const TOOLS = ['qemu-img', 'qemu-io', 'nbdinfo', '/dev/fuse'];
const MIB = 1024 * 1024;

interface Status {
  agent: { nbd?: string[] };
  manifests: { file: string; valid: boolean; errors: { message: string }[] }[];
  exports: {
    id: string;
    type: string;
    state: string;
    reason: string;
    mountpoint?: string;
    engine?: string;
    nbd?: { name: string; connections: number };
  }[];
}

function manifest(name: string, body: string): string {
  return `apiVersion: blkexport/v1\nkind: ExportSet\nmetadata:\n  name: ${name}\nspec:\n${body}`;
}

/** `spec.blockdevs` of a qcow2 image: nodes web-file and web-fmt (web-fmt is the one to export). */
function webNodes(qcow2: string): string {
  return `  blockdevs:
    - node-name: web-file
      driver: file
      filename: ${qcow2}
    - node-name: web-fmt
      driver: qcow2
      file: web-file
`;
}

/** A free loopback TCP port (bound and released: the qemu engine's server needs a fixed one). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const a = srv.address() as AddressInfo;
      srv.close(() => resolve(a.port));
    });
  });
}

/**
 * A CA, a server certificate for localhost/127.0.0.1 and a client
 * certificate, made by openssl; directories laid out as qemu and libnbd
 * read them: `server` (ca-cert.pem, server-cert.pem, server-key.pem),
 * `client` (ca-cert.pem, client-cert.pem, client-key.pem) and `anonymous`
 * (ca-cert.pem only).
 */
async function makePki(
  t: Parameters<typeof tempDir>[0],
): Promise<{ server: string; client: string; anonymous: string }> {
  const dir = tempDir(t, 'blkexport-nbd-pki-');
  const server = join(dir, 'server');
  const client = join(dir, 'client');
  const anonymous = join(dir, 'anonymous');
  for (const p of [server, client, anonymous]) mkdirSync(p);
  const ossl = (...a: string[]) => sh('openssl', a);
  const ca = join(server, 'ca-cert.pem');
  const caKey = join(dir, 'ca-key.pem');
  await ossl(
    'req',
    '-x509',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-keyout',
    caKey,
    '-out',
    ca,
    '-days',
    '2',
    '-subj',
    '/CN=blkexport test CA',
  );
  const sign = async (key: string, cert: string, cn: string, ext: string) => {
    const csr = join(dir, `${cn}.csr`);
    const extFile = join(dir, `${cn}.cnf`);
    writeFileSync(extFile, ext);
    await ossl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${cn}`);
    await ossl(
      'x509',
      '-req',
      '-in',
      csr,
      '-CA',
      ca,
      '-CAkey',
      caKey,
      '-CAcreateserial',
      '-out',
      cert,
      '-days',
      '2',
      '-extfile',
      extFile,
    );
  };
  await sign(
    join(server, 'server-key.pem'),
    join(server, 'server-cert.pem'),
    'localhost',
    'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n',
  );
  await sign(
    join(client, 'client-key.pem'),
    join(client, 'client-cert.pem'),
    'client',
    'extendedKeyUsage=clientAuth\n',
  );
  copyFileSync(ca, join(client, 'ca-cert.pem'));
  copyFileSync(ca, join(anonymous, 'ca-cert.pem'));
  return { server, client, anonymous };
}

/** A 16 MiB qcow2 with data, a zeroed run and unallocated space; returns it and its raw conversion. */
function makeImage(dir: string, name: string, pattern: number): { qcow2: string; raw: Buffer } {
  const qcow2 = join(dir, `${name}.qcow2`);
  qemuImg('create', '-q', '-f', 'qcow2', qcow2, '16M');
  qemuIo(qcow2, '-c', `write -P ${pattern} 0 1M`, '-c', 'write -z 4M 1M', '-c', 'write -P 0x5a 9000001 7777');
  const ref = join(dir, `${name}.ref.raw`);
  qemuImg('convert', '-f', 'qcow2', '-O', 'raw', qcow2, ref);
  const raw = readFileSync(ref);
  rmSync(ref);
  return { qcow2, raw };
}

/** `qemu-img convert` of NBD export `name` on Unix socket `sock` to raw bytes. */
async function readNbd(dir: string, sock: string, name: string): Promise<Buffer> {
  const out = join(dir, `read-${name}.raw`);
  await sh('qemu-img', ['convert', '-f', 'raw', `nbd+unix:///${name}?socket=${sock}`, '-O', 'raw', out]);
  const data = readFileSync(out);
  rmSync(out);
  return data;
}

/** The export names (and descriptions) `nbdinfo --list` shows. */
async function listNbd(sock: string): Promise<Array<{ name: string; description?: string }>> {
  const out = await sh('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${sock}`]);
  const doc = JSON.parse(out.toString()) as {
    exports: Array<{ 'export-name': string; description?: string }>;
  };
  return doc.exports.map((e) => ({
    name: e['export-name'],
    ...(e.description !== undefined ? { description: e.description } : {}),
  }));
}

describe('agent: type: nbd exports', { concurrency: false, timeout: 240_000 }, () => {
  test('served, listed, shared with a FUSE export, counted; added and removed live', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const web = makeImage(d.images, 'web', 0xab);
    const db = makeImage(d.images, 'db', 0xcd);
    const sock = join(d.dir, 'nbd.sock');
    const fuseMp = join(d.images, 'web.qcow2');
    // Long form: one node, exported over FUSE (on the image itself) and over NBD (read-only both).
    writeFileSync(
      join(d.manifests, 'web.yaml'),
      manifest(
        'web',
        `${webNodes(web.qcow2)}  exports:
    - type: fuse
      id: web-fuse
      node-name: web-fmt
      mountpoint: ${fuseMp}
    - type: nbd
      id: web-nbd
      node-name: web-fmt
      name: web
      description: web server disk
`,
      ),
    );
    const agent = await startAgent(t, d, ['--nbd-listen', `unix:${sock}`]);
    await until('web-nbd ready', async () => {
      const s = await agent.get<Status>('/status');
      return s.exports.length === 2 && s.exports.every((e) => e.state === 'ready');
    });
    let s = await agent.get<Status>('/status');
    assert.deepEqual(s.agent.nbd, [`unix:${sock}`]);
    assert.equal(statSync(sock).mode & 0o777, 0o600, 'the NBD socket is owner-only by default');
    const nbdExp = s.exports.find((e) => e.id === 'web-nbd')!;
    assert.equal(nbdExp.type, 'nbd');
    assert.equal(nbdExp.mountpoint, undefined);
    assert.deepEqual(nbdExp.nbd, { name: 'web', connections: 0 });
    assert.equal(s.exports.find((e) => e.id === 'web-fuse')!.mountpoint, fuseMp);

    // Both exports of the one node read the image's bytes.
    assert.ok((await readNbd(d.dir, sock, 'web')).equals(web.raw), 'NBD read differs from qemu-img convert');
    assert.ok(readExport(fuseMp).equals(web.raw), 'FUSE read differs from qemu-img convert');
    assert.deepEqual(await listNbd(sock), [{ name: 'web', description: 'web server disk' }]);

    // A connected client shows in status, the table and /metrics.
    const client = await RawClient.open(sock);
    t.after(() => client.destroy());
    await client.goStructured('web');
    await until('one connection in status', async () => {
      const x = await agent.get<Status>('/status');
      return x.exports.find((e) => e.id === 'web-nbd')?.nbd?.connections === 1;
    });
    const metrics = await agent.get<string>('/metrics');
    assert.match(metrics, /blkexport_export_nbd_connections\{export="web-nbd"\} 1/);
    assert.match(
      metrics,
      /blkexport_export_info\{export="web-nbd",engine="native",type="nbd",counted="yes"\} 1/,
    );
    assert.match(metrics, /blkexport_export_read_bytes_total\{export="web-nbd"\} [1-9]/);
    const table = run(BIN, ['status', '--socket', agent.socket]);
    assert.equal(table.status, 0, table.stderr);
    assert.match(table.stdout, /NBD server listening on unix:/);
    assert.match(table.stdout, /web-nbd .* nbd:web \(1 connected\)/);

    // A second manifest adds a shorthand NBD export live.
    writeFileSync(
      join(d.manifests, 'db.yaml'),
      manifest('db', `  exports:\n    - type: nbd\n      id: db\n      image: ${db.qcow2}\n`),
    );
    await agent.post('/reconcile');
    assert.deepEqual((await listNbd(sock)).map((e) => e.name).sort(), ['db', 'web']);
    assert.ok((await readNbd(d.dir, sock, 'db')).equals(db.raw), 'shorthand NBD read differs');

    // plan against the running agent: nothing to do; the NBD exports are named as such.
    const plan = run(BIN, ['plan', '--manifests', d.manifests, '--socket', agent.socket]);
    assert.equal(plan.status, 0, plan.stdout + plan.stderr);

    // Removing the NBD export from the manifest: the connected client is closed, new ones find
    // nothing, the FUSE export of the same node keeps serving.
    writeFileSync(
      join(d.manifests, 'web.yaml'),
      readFileSync(join(d.manifests, 'web.yaml'), 'utf8').replace(/ {4}- type: nbd\n(?: {6}.*\n)+/, ''),
    );
    await agent.post('/reconcile');
    assert.ok(await client.closedWithin(5000), 'the connected client of a removed export was not closed');
    assert.deepEqual(
      (await listNbd(sock)).map((e) => e.name),
      ['db'],
    );
    await assert.rejects(readNbd(d.dir, sock, 'web'));
    s = await agent.get<Status>('/status');
    assert.deepEqual(s.exports.map((e) => `${e.id}:${e.state}`).sort(), ['db:ready', 'web-fuse:ready']);
    assert.ok(readExport(fuseMp).equals(web.raw), 'the FUSE export stopped serving');
  });

  test('a writable NBD export sharing its node with a read-only FUSE export: qemu-io writes, zeroes and discards; the FUSE export sees them; the image stays clean and equal to the same writes done by qemu-io', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const img = makeImage(d.images, 'rw', 0x11);
    const copy = join(d.dir, 'copy.qcow2');
    copyFileSync(img.qcow2, copy);
    const sock = join(d.dir, 'nbd.sock');
    const view = join(d.images, 'rw-view.raw');
    const file = join(d.manifests, 'rw.yaml');
    writeFileSync(
      file,
      manifest(
        'rw',
        `  blockdevs:
    - node-name: rw-file
      driver: file
      filename: ${img.qcow2}
    - node-name: rw-fmt
      driver: qcow2
      file: rw-file
  exports:
    - type: nbd
      id: rw
      node-name: rw-fmt
      writable: true
    - type: fuse
      id: rw-view
      node-name: rw-fmt
      mountpoint: ${view}
      create-mountpoint: true
`,
      ),
    );
    const agent = await startAgent(t, d, ['--nbd-listen', `unix:${sock}`]);
    await until('rw ready', async () => {
      const s = await agent.get<Status>('/status');
      return s.exports.length === 2 && s.exports.every((e) => e.state === 'ready');
    });
    // The FUSE export reads before the writes (whatever it may cache must not outlive them).
    assert.ok(readExport(view).equals(img.raw));
    const ops = [
      'write -P 0x77 512 70000',
      'write -z 2M 1M',
      'discard 8M 1M',
      'write -P 0x33 16773120 4096',
      'flush',
    ];
    const args = ops.flatMap((o) => ['-c', o]);
    await sh('qemu-io', ['-f', 'raw', ...args, `nbd+unix:///rw?socket=${sock}`]);
    qemuIo(copy, ...args);
    // Reads through both exports equal the copy's.
    const ref = join(d.dir, 'ref.raw');
    qemuImg('convert', '-f', 'qcow2', '-O', 'raw', copy, ref);
    const want = readFileSync(ref);
    assert.ok((await readNbd(d.dir, sock, 'rw')).equals(want), 'NBD read after writes differs');
    assert.ok(readExport(view).equals(want), 'the FUSE export of the same node misses the NBD writes');
    // Removing the exports flushes them; the image is then clean and equal to the copy.
    rmSync(file);
    await agent.post('/reconcile');
    await until('rw gone', async () => (await agent.get<Status>('/status')).exports.length === 0);
    const check = run('qemu-img', ['check', '-f', 'qcow2', img.qcow2]);
    assert.equal(check.status, 0, check.stdout + check.stderr);
    const cmp = run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', img.qcow2, copy]);
    assert.equal(cmp.status, 0, cmp.stdout + cmp.stderr);
  });

  test('a manifest whose NBD name another manifest uses is refused, naming both; the first keeps serving', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const a = makeImage(d.images, 'a', 0x01);
    const b = makeImage(d.images, 'b', 0x02);
    const sock = join(d.dir, 'nbd.sock');
    writeFileSync(
      join(d.manifests, '10-a.yaml'),
      manifest(
        'first',
        `  exports:\n    - type: nbd\n      id: a\n      name: disk\n      image: ${a.qcow2}\n`,
      ),
    );
    writeFileSync(
      join(d.manifests, '20-b.yaml'),
      manifest(
        'second',
        `  exports:\n    - type: nbd\n      id: b\n      name: disk\n      image: ${b.qcow2}\n`,
      ),
    );
    const agent = await startAgent(t, d, ['--nbd-listen', `unix:${sock}`]);
    await until('a ready', async () => (await agent.get<Status>('/status')).exports[0]?.state === 'ready');
    const s = await agent.get<Status>('/status');
    assert.deepEqual(
      s.exports.map((e) => e.id),
      ['a'],
    );
    const refused = s.manifests.find((m) => m.file.endsWith('20-b.yaml'))!;
    assert.equal(refused.valid, false);
    assert.match(
      refused.errors[0]!.message,
      /NBD export name "disk" is already used by manifest "first" at .*; this manifest \("second"\) is refused as a whole/,
    );
    assert.ok((await readNbd(d.dir, sock, 'disk')).equals(a.raw));
  });

  test('plain TCP is refused unless --nbd-insecure-tcp; with it, a loopback client reads', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const refused = run(
      BIN,
      [
        'agent',
        '--manifests',
        d.manifests,
        '--socket',
        join(d.dir, 'x.sock'),
        '--allow-root',
        d.images,
        '--nbd-listen',
        'tcp:127.0.0.1:0',
      ],
      { timeoutMs: 20_000 },
    );
    assert.equal(refused.status, 1);
    assert.match(refused.stderr, /refusing to serve tcp:127\.0\.0\.1:0 without TLS: .*--nbd-insecure-tcp/);
    const img = makeImage(d.images, 'tcp', 0x44);
    writeFileSync(
      join(d.manifests, 'tcp.yaml'),
      manifest('tcp', `  exports:\n    - type: nbd\n      id: tcp\n      image: ${img.qcow2}\n`),
    );
    const agent = await startAgent(t, d, ['--nbd-listen', 'tcp:127.0.0.1:0', '--nbd-insecure-tcp']);
    const addr = await until(
      'the NBD server to listen',
      async () => (await agent.get<Status>('/status')).agent.nbd?.[0],
    );
    const port = Number(/^tcp:127\.0\.0\.1:([0-9]+)$/.exec(addr)![1]);
    assert.ok(port > 0);
    const out = join(d.dir, 'tcp.raw');
    await sh('qemu-img', ['convert', '-f', 'raw', `nbd://127.0.0.1:${port}/tcp`, '-O', 'raw', out]);
    assert.ok(readFileSync(out).equals(img.raw));
  });
  test('TLS PSK on loopback TCP, and a Unix socket for a group: nbdinfo reads with the key, a wrong key is refused', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const img = makeImage(d.images, 'psk', 0x66);
    writeFileSync(
      join(d.manifests, 'psk.yaml'),
      manifest('psk', `  exports:\n    - type: nbd\n      id: p\n      image: ${img.qcow2}\n`),
    );
    const key = (fill: number) => Buffer.alloc(32, fill).toString('hex');
    const keys = join(d.dir, 'keys.psk');
    const wrong = join(d.dir, 'wrong.psk');
    writeFileSync(keys, `alice:${key(0x42)}\n`);
    writeFileSync(wrong, `alice:${key(0x43)}\n`);
    const sock = join(d.dir, 'nbd.sock');
    // A group that exists on every Debian system, by name: resolved from /etc/group.
    const disk = readFileSync('/etc/group', 'utf8').match(/^disk:[^:]*:([0-9]+):/m);
    assert.ok(disk, 'no disk group in /etc/group');
    const agent = await startAgent(t, d, [
      '--nbd-listen',
      'tcp:127.0.0.1:0',
      '--nbd-listen',
      `unix:${sock}`,
      '--nbd-tls-psk',
      keys,
      '--nbd-socket-group',
      'disk',
    ]);
    const addr = await until(
      'the NBD server to listen',
      async () => (await agent.get<Status>('/status')).agent.nbd?.[0],
    );
    const port = Number(/^tcp:127\.0\.0\.1:([0-9]+)$/.exec(addr)![1]);
    const st = statSync(sock);
    assert.equal(st.mode & 0o777, 0o660);
    assert.equal(st.gid, Number(disk[1]));
    const info = (await sh('nbdinfo', [`nbds://alice@127.0.0.1:${port}/p?tls-psk-file=${keys}`])).toString();
    assert.match(info, /with TLS/);
    await assert.rejects(sh('nbdinfo', [`nbds://alice@127.0.0.1:${port}/p?tls-psk-file=${wrong}`]));
    // TLS is forced on the Unix socket too: a plain client is refused.
    await assert.rejects(readNbd(d.dir, sock, 'p'));
    const out = (
      await sh('nbdinfo', ['--size', `nbds+unix://alice@/p?socket=${sock}&tls-psk-file=${keys}`])
    ).toString();
    assert.equal(Number(out.trim()), img.raw.length);
  });
  test('both engines serve the same manifest byte for byte (qemu: QSD nbd-server-start + block-export-add type=nbd); a removed export drops its client', async (t) => {
    if (!needTools(t, ...TOOLS, 'qemu-storage-daemon')) return;
    const seen: Record<string, { list: unknown; web: Buffer; db: Buffer; written: Buffer }> = {};
    let images: { web: { raw: Buffer }; db: { raw: Buffer } } | undefined;
    for (const engine of ['native', 'qemu'] as const) {
      const { d, start } = qsdAgentSetup(t, engine);
      const web = makeImage(d.images, 'web', 0xab);
      const db = makeImage(d.images, 'db', 0xcd);
      images = { web, db };
      const sock = join(d.dir, 'nbd.sock');
      writeFileSync(
        join(d.manifests, 'm.yaml'),
        manifest(
          'm',
          `${webNodes(web.qcow2)}  exports:
    - type: nbd
      id: web-nbd
      node-name: web-fmt
      name: web
      description: web server disk
    - type: nbd
      id: db
      image: ${db.qcow2}
      format: qcow2
      writable: true
`,
        ),
      );
      const agent = await start(engine, ['--nbd-listen', `unix:${sock}`]);
      await until(`${engine}: both ready`, async () => {
        const s = await agent.get<Status>('/status');
        return s.exports.length === 2 && s.exports.every((e) => e.state === 'ready' && e.engine === engine);
      });
      await sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 4096 65536', `nbd+unix:///db?socket=${sock}`]);
      const client = await RawClient.open(sock);
      t.after(() => client.destroy());
      await client.goStructured('web');
      seen[engine] = {
        list: (await listNbd(sock)).sort((a, b) => a.name.localeCompare(b.name)),
        web: await readNbd(d.dir, sock, 'web'),
        db: await readNbd(d.dir, sock, 'db'),
        written: Buffer.alloc(0),
      };
      // Removing the web export live: its connected client is closed, the other export serves on.
      const file = join(d.manifests, 'm.yaml');
      writeFileSync(
        file,
        readFileSync(file, 'utf8').replace(/ {4}- type: nbd\n {6}id: web-nbd\n(?: {6}.*\n)+/, ''),
      );
      await agent.post('/reconcile');
      assert.ok(await client.closedWithin(5000), `${engine}: the client of a removed export was not closed`);
      assert.deepEqual(
        (await listNbd(sock)).map((e) => e.name),
        ['db'],
      );
      // The agent stops; the write is in the image file.
      agent.proc.kill('SIGTERM');
      assert.equal(await agent.exited, 0);
      const out = join(d.dir, 'db-after.raw');
      qemuImg('convert', '-f', 'qcow2', '-O', 'raw', db.qcow2, out);
      seen[engine]!.written = readFileSync(out);
      const check = run('qemu-img', ['check', '-f', 'qcow2', db.qcow2]);
      assert.equal(check.status, 0, check.stdout + check.stderr);
    }
    const want = Buffer.from(images!.db.raw);
    want.fill(0x99, 4096, 4096 + 65536);
    for (const engine of ['native', 'qemu']) {
      const r = seen[engine]!;
      assert.deepEqual(r.list, [{ name: 'db' }, { name: 'web', description: 'web server disk' }], engine);
      assert.ok(r.web.equals(images!.web.raw), `${engine}: web differs from qemu-img convert`);
      assert.ok(r.db.equals(want), `${engine}: db after the write differs`);
      assert.ok(r.written.equals(want), `${engine}: the image file after stop differs`);
    }
    assert.ok(seen.native!.web.equals(seen.qemu!.web) && seen.native!.db.equals(seen.qemu!.db));
  });
  test('overlay: ephemeral over NBD: a client writes, reads its writes back; the image stays as it was; the overlay goes with the export', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const img = makeImage(d.images, 'gold', 0x21);
    const before = readFileSync(img.qcow2);
    const ovl = join(d.dir, 'overlays');
    mkdirSync(ovl);
    const sock = join(d.dir, 'nbd.sock');
    const file = join(d.manifests, 'gold.yaml');
    writeFileSync(
      file,
      manifest(
        'gold',
        `  exports:\n    - type: nbd\n      id: gold\n      image: ${img.qcow2}\n      overlay: ephemeral\n`,
      ),
    );
    const agent = await startAgent(t, d, ['--nbd-listen', `unix:${sock}`, '--overlay-dir', ovl]);
    await until('gold ready', async () => (await agent.get<Status>('/status')).exports[0]?.state === 'ready');
    assert.equal(readdirSync(ovl).length, 1, 'one overlay file while the export lives');
    await sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 1M 2M', `nbd+unix:///gold?socket=${sock}`]);
    const want = Buffer.from(img.raw);
    want.fill(0x42, MIB, 3 * MIB);
    assert.ok((await readNbd(d.dir, sock, 'gold')).equals(want), 'the writes are not read back');
    rmSync(file);
    await agent.post('/reconcile');
    await until('gold gone', async () => (await agent.get<Status>('/status')).exports.length === 0);
    assert.deepEqual(readdirSync(ovl), [], 'the overlay outlived its export');
    assert.ok(readFileSync(img.qcow2).equals(before), 'the image file changed');
  });
  test('qemu engine with TLS PSK: QSD gets tls-creds-psk; nbdcopy reads with the key, a plain client is refused', async (t) => {
    if (!needTools(t, ...TOOLS, 'qemu-storage-daemon', 'nbdcopy')) return;
    const { d, start } = qsdAgentSetup(t, 'qemu');
    const img = makeImage(d.images, 'q', 0x71);
    writeFileSync(
      join(d.manifests, 'q.yaml'),
      manifest('q', `  exports:\n    - type: nbd\n      id: q\n      image: ${img.qcow2}\n`),
    );
    const keys = join(d.dir, 'keys.psk');
    writeFileSync(keys, `alice:${Buffer.alloc(32, 0x42).toString('hex')}\n`);
    const sock = join(d.dir, 'nbd.sock');
    const agent = await start('qemu', ['--nbd-listen', `unix:${sock}`, '--nbd-tls-psk', keys]);
    await until('q ready', async () => {
      const e = (await agent.get<Status & { exports: { engine: string }[] }>('/status')).exports[0];
      return e?.state === 'ready' && e.engine === 'qemu';
    });
    const out = join(d.dir, 'q.raw');
    await sh('nbdcopy', [`nbds+unix://alice@/q?socket=${sock}&tls-psk-file=${keys}`, out]);
    assert.ok(readFileSync(out).equals(img.raw), 'qemu engine over TLS PSK: bytes differ');
    await assert.rejects(readNbd(d.dir, sock, 'q'));
  });
  test('a handover (SIGUSR2) ends NBD connections; the next agent serves the NBD export again on the same socket', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const d = agentDir(t);
    const img = makeImage(d.images, 'h', 0x5e);
    writeFileSync(
      join(d.manifests, 'h.yaml'),
      manifest(
        'h',
        `  exports:\n    - type: nbd\n      id: h\n      image: ${img.qcow2}\n      format: qcow2\n      writable: true\n`,
      ),
    );
    const sock = join(d.dir, 'nbd.sock');
    const first = await startAgent(t, d, ['--nbd-listen', `unix:${sock}`]);
    await until('h ready', async () => (await first.get<Status>('/status')).exports[0]?.state === 'ready');
    await sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x17 0 64k', `nbd+unix:///h?socket=${sock}`]);
    const client = await RawClient.open(sock);
    t.after(() => client.destroy());
    await client.goStructured('h');
    first.proc.kill('SIGUSR2');
    assert.equal(await first.exited, 75);
    assert.ok(await client.closedWithin(5000), 'a connection outlived the agent process');
    const second = await startAgent(t, d, ['--nbd-listen', `unix:${sock}`]);
    await until(
      'h ready again',
      async () => (await second.get<Status>('/status')).exports[0]?.state === 'ready',
    );
    const want = Buffer.from(img.raw);
    want.fill(0x17, 0, 64 * 1024);
    assert.ok(
      (await readNbd(d.dir, sock, 'h')).equals(want),
      'the write before the handover is not read back',
    );
  });
  test('x509 with client certificates on loopback TCP, both engines: a client with a certificate the CA signed reads, one without is refused', async (t) => {
    if (!needTools(t, ...TOOLS, 'qemu-storage-daemon', 'openssl')) return;
    const pki = await makePki(t);
    for (const engine of ['native', 'qemu'] as const) {
      const { d, start } = qsdAgentSetup(t, engine);
      const img = makeImage(d.images, 'sec', 0x3c);
      writeFileSync(
        join(d.manifests, 'sec.yaml'),
        manifest('sec', `  exports:\n    - type: nbd\n      id: sec\n      image: ${img.qcow2}\n`),
      );
      const port = await freePort();
      const agent = await start(engine, [
        '--nbd-listen',
        `tcp:127.0.0.1:${port}`,
        '--nbd-tls-cert',
        join(pki.server, 'server-cert.pem'),
        '--nbd-tls-key',
        join(pki.server, 'server-key.pem'),
        '--nbd-tls-ca',
        join(pki.server, 'ca-cert.pem'),
      ]);
      await until(`${engine}: sec ready`, async () => {
        const e = (await agent.get<Status & { exports: { engine: string }[] }>('/status')).exports[0];
        return e?.state === 'ready' && e.engine === engine;
      });
      const out = join(d.dir, 'sec.raw');
      await sh('nbdcopy', [`nbds://localhost:${port}/sec?tls-certificates=${pki.client}`, out]);
      assert.ok(readFileSync(out).equals(img.raw), `${engine}: bytes over x509 differ`);
      await assert.rejects(
        sh('nbdinfo', [`nbds://localhost:${port}/sec?tls-certificates=${pki.anonymous}`]),
        Error,
        `${engine}: a client without a certificate was served`,
      );
      agent.proc.kill('SIGTERM');
      assert.equal(await agent.exited, 0);
    }
  });
});
