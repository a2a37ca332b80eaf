/**
 * `blkexport nbd` against the real clients (qemu-img, qemu-io, nbdinfo,
 * nbdcopy from Debian's qemu-utils and libnbd-bin), on Unix sockets and
 * loopback TCP: reads byte-identical to `qemu-img convert -O raw`, the
 * allocation map equal to `qemu-img map`, writes that leave a clean image
 * equal to the same writes done by qemu-io on a copy, export listing with
 * descriptions, TLS with x509 and PSK, and plain TCP refused.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { sh, startNbdCommand } from '../helpers/nbd.js';
import { BIN, needTools, qemuImg, qemuIo, run, tempDir } from '../helpers/tools.js';

/** A 64 MiB qcow2 with data, a zero cluster run, unallocated space and an unaligned write. */
function makeImage(dir: string, name = 'disk.qcow2'): string {
  const img = join(dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
  qemuIo(
    img,
    '-c',
    'write -P 0xab 0 1M',
    '-c',
    'write -P 0xcd 10M 3M',
    '-c',
    'write -z 20M 1M',
    '-c',
    'write -P 0x5a 33554000 9000',
  );
  return img;
}

interface Extent {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/** Adjacent extents with equal data/zero merged. */
function merge(extents: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    const last = out[out.length - 1];
    if (last && last.data === e.data && last.zero === e.zero && last.start + last.length === e.start) {
      last.length += e.length;
    } else out.push({ ...e });
  }
  return out;
}

const unixUri = (name: string, sock: string) => `nbd+unix:///${name}?socket=${sock}`;

/** qemu-img convert of export `name` on 127.0.0.1:`port` with TLS credentials `object`; checks the bytes. */
async function convertOverTls(dir: string, img: string, object: string, port: number, name: string) {
  const out = join(dir, 'o.raw');
  const opts = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=${name},tls-creds=tls0`;
  await sh('qemu-img', ['convert', '--object', object, '--image-opts', opts, '-O', 'raw', out]);
  qemuImg('convert', '-f', 'qcow2', '-O', 'raw', img, join(dir, 'ref.raw'));
  assert.ok(readFileSync(out).equals(readFileSync(join(dir, 'ref.raw'))), 'TLS read differs from the image');
}

describe('blkexport nbd with real clients', { timeout: 180_000 }, () => {
  test('reads equal qemu-img convert; nbdcopy; the map equals qemu-img map; --list shows the description', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy')) return;
    const dir = tempDir(t, 'blkexport-nbd-');
    const img = makeImage(dir);
    const sock = join(dir, 'nbd.sock');
    await startNbdCommand(t, BIN, [
      img,
      '--listen',
      `unix:${sock}`,
      '--name',
      'web',
      '--description',
      'web server disk',
    ]);
    const uri = unixUri('web', sock);

    qemuImg('convert', '-f', 'qcow2', '-O', 'raw', img, join(dir, 'ref.raw'));
    const ref = readFileSync(join(dir, 'ref.raw'));
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, join(dir, 'via-qemu.raw')]);
    assert.ok(readFileSync(join(dir, 'via-qemu.raw')).equals(ref), 'qemu-img convert over NBD differs');
    const copied = await sh('nbdcopy', ['--connections=4', uri, '-']);
    assert.ok(copied.equals(ref), 'nbdcopy differs');

    const nbdMap = JSON.parse((await sh('nbdinfo', ['--map', '--json', uri])).toString()) as Array<{
      offset: number;
      length: number;
      type: number;
    }>;
    const qemuMap = JSON.parse(qemuImg('map', '--output=json', '-f', 'qcow2', img)) as Extent[];
    assert.deepEqual(
      merge(
        nbdMap.map((e) => ({
          start: e.offset,
          length: e.length,
          data: (e.type & 1) === 0,
          zero: (e.type & 2) !== 0,
        })),
      ),
      merge(qemuMap.map((e) => ({ start: e.start, length: e.length, data: e.data, zero: e.zero }))),
    );

    const list = (await sh('nbdinfo', ['--list', `nbd+unix:///?socket=${sock}`])).toString();
    assert.match(list, /export="web":/);
    assert.match(list, /description: web server disk/);
    assert.match(list, /is_read_only: true/);
    assert.match(list, /can_multi_conn: true/);
    assert.match(list, /block_size_preferred: 65536/);
    // A read-only export refuses writes.
    await assert.rejects(sh('qemu-io', ['-f', 'raw', uri, '-c', 'write 0 4k']));
  });

  test('qemu:allocation-depth over a backing chain equals qemu-nbd -A', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo')) return;
    const dir = tempDir(t, 'blkexport-nbd-');
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', base, '16M');
    qemuIo(base, '-c', 'write -P 1 0 2M', '-c', 'write -P 2 6M 1M', '-c', 'write -z 9M 1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    qemuIo(top, '-c', 'write -P 3 1M 2M', '-c', 'write -z 6M 512k', '-c', 'write -P 4 12M 64k');
    const ours = join(dir, 'ours.sock');
    const theirs = join(dir, 'qemu.sock');
    await startNbdCommand(t, BIN, [top, '--listen', `unix:${ours}`]);
    const { spawn } = await import('node:child_process');
    const q = spawn('qemu-nbd', ['-r', '-A', '-t', '-f', 'qcow2', '-k', theirs, top], { stdio: 'ignore' });
    t.after(() => q.kill('SIGKILL'));
    for (let i = 0; i < 100 && !existsSync(theirs); i++) await new Promise((r) => setTimeout(r, 50));
    for (const context of ['qemu:allocation-depth', 'base:allocation']) {
      const map = async (sock: string) =>
        (await sh('nbdinfo', [`--map=${context}`, `nbd+unix:///?socket=${sock}`])).toString();
      const mine = await map(ours);
      assert.equal(mine, await map(theirs), context);
      if (context === 'qemu:allocation-depth') assert.match(mine, /backing depth 2/);
    }
  });

  test('qemu-io writes, zeroes and discards through a writable export: image clean and equal to the oracle', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t, 'blkexport-nbd-');
    const img = makeImage(dir);
    const oracle = join(dir, 'oracle.qcow2');
    qemuImg('convert', '-f', 'qcow2', '-O', 'qcow2', img, oracle);
    const sock = join(dir, 'nbd.sock');
    const srv = await startNbdCommand(t, BIN, [img, '--writable', '--listen', `unix:${sock}`, '--name', 'w']);
    const ops = [
      'write -P 0x11 5M 2M',
      'write -z 0 64k',
      'discard 10M 1M',
      'write -P 0x22 -f 30M 65k', // FUA
      'write -z -u 40M 3M',
      'write -P 0x33 100 1000', // unaligned
      'write -z 50001 70000', // unaligned zeroes
      'flush',
    ].flatMap((c) => ['-c', c]);
    const out = (await sh('qemu-io', ['-f', 'raw', unixUri('w', sock), ...ops])).toString();
    assert.doesNotMatch(out, /error|failed/i);
    qemuIo('-f', 'qcow2', oracle, ...ops);
    assert.equal(await srv.stop(), 0);
    const check = run('qemu-img', ['check', img]);
    assert.equal(check.status, 0, check.stdout + check.stderr);
    assert.match(check.stdout, /No errors were found/);
    assert.equal(run('qemu-img', ['compare', img, oracle]).status, 0, 'image differs from the oracle');
  });

  test('--overlay: writes through NBD land in a throwaway overlay; the image stays byte-identical, the overlay goes', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t, 'blkexport-nbd-');
    const img = makeImage(dir);
    const before = readFileSync(img);
    const ovDir = join(dir, 'overlays');
    mkdirSync(ovDir);
    const sock = join(dir, 'nbd.sock');
    const srv = await startNbdCommand(t, BIN, [
      img,
      '--overlay',
      '--overlay-dir',
      ovDir,
      '--listen',
      `unix:${sock}`,
    ]);
    assert.match(srv.ready, /writable into a throwaway overlay in .*overlays \(the image is not written\)/);
    await sh('qemu-io', ['-f', 'raw', unixUri('', sock), '-c', 'write -P 0x77 0 128k', '-c', 'flush']);
    const read = await sh('qemu-io', [
      '-f',
      'raw',
      unixUri('', sock),
      '-c',
      'read -P 0x77 0 128k',
      '-c',
      'read -P 0xcd 10M 1M',
    ]);
    assert.doesNotMatch(read.toString(), /fail|mismatch/i, read.toString());
    // The overlay file's name is removed at once; only the server holds it.
    assert.deepEqual(readdirSync(ovDir), []);
    assert.equal(await srv.stop(), 0);
    assert.ok(readFileSync(img).equals(before), 'the image was written');
    assert.deepEqual(readdirSync(ovDir), []);
  });

  test('--snapshot NAME serves an internal snapshot read-only, like qemu-img convert -l', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t, 'blkexport-nbd-');
    const img = makeImage(dir);
    qemuImg('snapshot', '-c', 'before', img);
    qemuIo(img, '-c', 'write -P 0xee 0 2M');
    const ref = join(dir, 'ref.raw');
    qemuImg('convert', '-f', 'qcow2', '-l', 'snapshot.name=before', '-O', 'raw', img, ref);
    const sock = join(dir, 'nbd.sock');
    const srv = await startNbdCommand(t, BIN, [img, '--snapshot', 'before', '--listen', `unix:${sock}`]);
    assert.match(srv.ready, /at internal snapshot "before" \(id 1\).*read-only/);
    const out = join(dir, 'out.raw');
    await sh('qemu-img', ['convert', '-f', 'raw', unixUri('', sock), '-O', 'raw', out]);
    assert.ok(
      readFileSync(out).equals(readFileSync(ref)),
      'the snapshot view differs from qemu-img convert -l',
    );
    assert.equal(await srv.stop(), 0);
    const bad = run(BIN, ['nbd', img, '--snapshot', 'before', '--writable', '--listen', `unix:${sock}`]);
    assert.equal(bad.status, 1, bad.stderr);
    assert.match(bad.stderr, /--snapshot shows an internal snapshot read-only: it cannot be --writable/);
  });

  test('plain TCP is refused unless --insecure-tcp; with it qemu-img reads over loopback', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io')) return;
    const dir = tempDir(t, 'blkexport-nbd-');
    const img = makeImage(dir);
    const refused = run(BIN, ['nbd', img, '--listen', 'tcp:127.0.0.1:0']);
    assert.equal(refused.status, 1);
    assert.match(refused.stderr, /refusing to serve tcp:127\.0\.0\.1:0 without TLS/);
    const srv = await startNbdCommand(t, BIN, [
      img,
      '--listen',
      'tcp:127.0.0.1:0',
      '--insecure-tcp',
      '--name',
      'x',
    ]);
    assert.ok(srv.port);
    const got = await sh('qemu-img', [
      'convert',
      '-f',
      'raw',
      '-O',
      'raw',
      `nbd://127.0.0.1:${srv.port}/x`,
      join(dir, 'o.raw'),
    ]);
    assert.equal(got.length, 0);
    qemuImg('convert', '-f', 'qcow2', '-O', 'raw', img, join(dir, 'ref.raw'));
    assert.ok(readFileSync(join(dir, 'o.raw')).equals(readFileSync(join(dir, 'ref.raw'))));
  });

  test('TLS x509: nbdinfo and qemu-img with tls-creds-x509 read; a client without TLS is refused', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io', 'nbdinfo', 'openssl')) return;
    const dir = tempDir(t, 'blkexport-nbd-');
    const img = makeImage(dir);
    const pki = join(dir, 'pki');
    const ossl = (...a: string[]) => sh('openssl', a);
    await sh('mkdir', ['-p', pki]);
    await ossl(
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-keyout',
      join(pki, 'ca-key.pem'),
      '-out',
      join(pki, 'ca-cert.pem'),
      '-days',
      '2',
      '-subj',
      '/CN=blkexport test CA',
    );
    await ossl(
      'req',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-keyout',
      join(pki, 'server-key.pem'),
      '-out',
      join(pki, 'server.csr'),
      '-subj',
      '/CN=localhost',
    );
    writeFileSync(
      join(pki, 'ext.cnf'),
      'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n',
    );
    await ossl(
      'x509',
      '-req',
      '-in',
      join(pki, 'server.csr'),
      '-CA',
      join(pki, 'ca-cert.pem'),
      '-CAkey',
      join(pki, 'ca-key.pem'),
      '-CAcreateserial',
      '-out',
      join(pki, 'server-cert.pem'),
      '-days',
      '2',
      '-extfile',
      join(pki, 'ext.cnf'),
    );
    const clientDir = join(dir, 'client');
    await sh('mkdir', ['-p', clientDir]);
    writeFileSync(join(clientDir, 'ca-cert.pem'), readFileSync(join(pki, 'ca-cert.pem')));

    const srv = await startNbdCommand(t, BIN, [
      img,
      '--listen',
      'tcp:127.0.0.1:0',
      '--name',
      'sec',
      '--tls-cert',
      join(pki, 'server-cert.pem'),
      '--tls-key',
      join(pki, 'server-key.pem'),
    ]);
    assert.match(srv.ready, /TLS x509/);
    const info = (
      await sh('nbdinfo', [`nbds://localhost:${srv.port}/sec?tls-certificates=${clientDir}`])
    ).toString();
    assert.match(info, /with TLS/);
    assert.match(info, /export-size: 67108864/);
    await convertOverTls(
      dir,
      img,
      `tls-creds-x509,id=tls0,dir=${clientDir},endpoint=client`,
      srv.port!,
      'sec',
    );
    await assert.rejects(sh('nbdinfo', [`nbd://127.0.0.1:${srv.port}/sec`]));
  });

  test('TLS PSK: nbdinfo and qemu-img with tls-creds-psk read; a wrong key is refused', async (t) => {
    if (!needTools(t, 'qemu-img', 'qemu-io', 'nbdinfo')) return;
    const dir = tempDir(t, 'blkexport-nbd-');
    const img = makeImage(dir);
    const pskDir = join(dir, 'psk');
    await sh('mkdir', ['-p', pskDir]);
    const key = (fill: number) => Buffer.alloc(32, fill).toString('hex');
    writeFileSync(join(pskDir, 'keys.psk'), `alice:${key(0x42)}\n`);
    writeFileSync(join(dir, 'wrong.psk'), `alice:${key(0x43)}\n`);
    const srv = await startNbdCommand(t, BIN, [
      img,
      '--listen',
      'tcp:127.0.0.1:0',
      '--name',
      'p',
      '--tls-psk',
      join(pskDir, 'keys.psk'),
    ]);
    const info = (
      await sh('nbdinfo', [`nbds://alice@127.0.0.1:${srv.port}/p?tls-psk-file=${join(pskDir, 'keys.psk')}`])
    ).toString();
    assert.match(info, /with TLS/);
    await convertOverTls(
      dir,
      img,
      `tls-creds-psk,id=tls0,dir=${pskDir},username=alice,endpoint=client`,
      srv.port!,
      'p',
    );
    await assert.rejects(
      sh('nbdinfo', [`nbds://alice@127.0.0.1:${srv.port}/p?tls-psk-file=${join(dir, 'wrong.psk')}`]),
    );
  });
});
