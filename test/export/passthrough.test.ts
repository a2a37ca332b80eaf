/**
 * FUSE passthrough of raw exports (docs/fuse-export.md, "Passthrough"): a raw
 * image made by qemu-img, exported from this process, read and written by
 * child processes (never from this one: it serves the mount), byte-identical
 * to the image file. The export's counters prove the kernel did the I/O:
 * with passthrough, no read or write reaches the export (the binding's own
 * fast path counts the reads it serves, so those would show too); with
 * BLKEXPORT_FUSE_PASSTHROUGH=off the same I/O is counted. Needs root and a
 * kernel with FUSE passthrough (Linux 6.9+); elsewhere the fallback tests
 * still run and the passthrough ones fail, as they should.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { closeSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { promisify } from 'node:util';
import { openImage } from '../../src/block/open-image.js';
import { FuseExport, type FuseExportOptions } from '../../src/export/fuse/export.js';
import { PASSTHROUGH_ENV } from '../../src/export/fuse/passthrough.js';
import { cleanupMountsUnder } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, randomBytes, run, seededRandom } from '../helpers/tools.js';

const execFileP = promisify(execFile);
const K = 1024;
const SIZE = 8 * 1024 * K;

/** A child process (asynchronously: this process serves the mount). */
async function sh(cmd: string, args: string[]): Promise<string> {
  const r = await execFileP(cmd, args, { maxBuffer: 64 << 20, timeout: 30_000, encoding: 'utf8' });
  return r.stdout;
}

/** The whole exported file as a child process reads it (O_DIRECT with `direct`). */
async function readThrough(path: string, direct: boolean, dir: string): Promise<Buffer> {
  const out = join(dir, 'read.bin');
  await sh('dd', [`if=${path}`, `of=${out}`, 'bs=64K', ...(direct ? ['iflag=direct'] : []), 'status=none']);
  return readFileSync(out);
}

/** Writes `data` at `off` through the export from a child process (O_DIRECT with `direct`). */
async function writeThrough(path: string, off: number, data: Buffer, direct: boolean, dir: string) {
  const chunk = join(dir, 'chunk.bin');
  writeFileSync(chunk, data);
  await sh('dd', [
    `if=${chunk}`,
    `of=${path}`,
    'bs=4K',
    `seek=${off / 4096}`,
    'conv=notrunc,fsync',
    ...(direct ? ['oflag=direct'] : []),
    'status=none',
  ]);
}

interface Mounted {
  exp: FuseExport;
  image: string;
  mountpoint: string;
  dir: string;
  ref: Buffer;
}

/** A raw image of random bytes (qemu-img create, then filled), exported on its own mountpoint file. */
async function mountRaw(
  t: TestContext,
  opts: { writable: boolean; growable: boolean; format?: 'raw' | 'qcow2' },
): Promise<Mounted> {
  const dir = mkdtempSync(join(tmpdir(), 'blkexport-pt-'));
  let exp: FuseExport | undefined;
  let img: Awaited<ReturnType<typeof openImage>> | undefined;
  // One after-hook, in order: stop serving, close the image, then any stray mount, then the files.
  t.after(async () => {
    try {
      await exp?.stop().catch(() => undefined);
      await img?.close().catch(() => undefined);
      cleanupMountsUnder(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  const format = opts.format ?? 'raw';
  const image = join(dir, `disk.${format}`);
  qemuImg('create', '-q', '-f', format, image, String(SIZE));
  const ref = randomBytes(seededRandom(14), SIZE);
  if (format === 'raw') writeFileSync(image, ref);
  const mountpoint = join(dir, 'export');
  writeFileSync(mountpoint, '');
  img = await openImage({ filename: image, format, readOnly: !opts.writable });
  const eopts: FuseExportOptions = {
    id: 'pt',
    mountpoint,
    writable: opts.writable,
    growable: opts.growable,
    allowOther: 'off',
    fsname: 'blkexport-test',
  };
  exp = await FuseExport.start(img.node, eopts);
  return { exp, image, mountpoint, dir, ref: format === 'raw' ? ref : Buffer.alloc(SIZE) };
}

/** Runs fn with BLKEXPORT_FUSE_PASSTHROUGH set to `value` (restored after). */
async function withEnv<T>(value: string, fn: () => Promise<T>): Promise<T> {
  const old = process.env[PASSTHROUGH_ENV];
  process.env[PASSTHROUGH_ENV] = value;
  try {
    return await fn();
  } finally {
    if (old === undefined) delete process.env[PASSTHROUGH_ENV];
    else process.env[PASSTHROUGH_ENV] = old;
  }
}

/** Seeded writes, buffered and O_DIRECT, through the export and into the reference. */
async function scribble(m: Mounted, seed: number): Promise<number> {
  const rand = seededRandom(seed);
  let bytes = 0;
  for (let i = 0; i < 12; i++) {
    const off = Math.floor(rand() * ((SIZE - 256 * K) / 4096)) * 4096;
    const data = randomBytes(rand, 4096 * (1 + Math.floor(rand() * 48)));
    await writeThrough(m.mountpoint, off, data, i % 2 === 0, m.dir);
    data.copy(m.ref, off);
    bytes += data.length;
  }
  return bytes;
}

describe('FUSE passthrough of raw exports', { concurrency: false }, () => {
  test('a read-only raw export is read by the kernel from the image: identical bytes, no read reaches the export', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse', 'dd')) return;
    const m = await mountRaw(t, { writable: false, growable: false });
    const pt = m.exp.passthrough;
    assert.ok(pt.active && pt.backingId > 0, JSON.stringify(pt));
    assert.ok((await readThrough(m.mountpoint, false, m.dir)).equals(m.ref), 'buffered read');
    assert.ok((await readThrough(m.mountpoint, true, m.dir)).equals(m.ref), 'O_DIRECT read');
    const s = m.exp.stats;
    assert.equal(s.passthrough, true);
    assert.equal(s.reads, 0, 'reads served by the export (JavaScript or its fast path)');
    assert.equal(s.readBytes, 0);
  });

  test('a writable growable raw export is written by the kernel: the image and the export agree byte for byte, nothing reaches the export, the size follows a write past the end', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse', 'dd', 'stat')) return;
    const m = await mountRaw(t, { writable: true, growable: true });
    assert.equal(m.exp.passthrough.active, true, JSON.stringify(m.exp.passthrough));
    await scribble(m, 21);
    assert.ok((await readThrough(m.mountpoint, false, m.dir)).equals(m.ref), 'read back through the export');
    assert.ok(readFileSync(m.image).equals(m.ref), 'the image file itself');
    const s = m.exp.stats;
    assert.equal(s.writes, 0, 'writes that reached the export');
    assert.equal(s.reads, 0, 'reads that reached the export');
    // Growable: a write past the end grows the image, and the export's size follows it.
    const tail = randomBytes(seededRandom(3), 64 * K);
    await writeThrough(m.mountpoint, SIZE + 1024 * K, tail, false, m.dir);
    const grown = SIZE + 1024 * K + tail.length;
    assert.equal(Number((await sh('stat', ['-c', '%s', m.mountpoint])).trim()), grown);
    assert.equal(m.exp.node.length(), grown);
    const back = await readThrough(m.mountpoint, true, m.dir);
    assert.ok(back.subarray(0, SIZE).equals(m.ref));
    assert.ok(back.subarray(SIZE, SIZE + 1024 * K).equals(Buffer.alloc(1024 * K)));
    assert.ok(back.subarray(SIZE + 1024 * K).equals(tail));
  });

  test(`the fallback (${PASSTHROUGH_ENV}=off): the same reads and writes go through the export, byte-identical`, async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse', 'dd')) return;
    const m = await withEnv('off', () => mountRaw(t, { writable: true, growable: true }));
    assert.deepEqual(m.exp.passthrough, { active: false, why: 'options', reason: `${PASSTHROUGH_ENV}=off` });
    const written = await scribble(m, 21);
    assert.ok((await readThrough(m.mountpoint, true, m.dir)).equals(m.ref));
    assert.ok(readFileSync(m.image).equals(m.ref));
    const s = m.exp.stats;
    assert.equal(s.passthrough, undefined);
    assert.ok(s.writeBytes >= written, `writes counted: ${s.writeBytes} of ${written}`);
    assert.ok(s.readBytes >= SIZE, `reads counted: ${s.readBytes}`);
  });

  test('a writable export that is not growable falls back (a write past the end must stay refused)', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse', 'dd')) return;
    const m = await mountRaw(t, { writable: true, growable: false });
    assert.equal(m.exp.passthrough.active, false);
    assert.match(m.exp.passthrough.active ? '' : m.exp.passthrough.reason, /not growable/);
    await assert.rejects(writeThrough(m.mountpoint, SIZE, Buffer.alloc(4096, 1), false, m.dir));
    assert.equal(readFileSync(m.image).length, SIZE);
    await scribble(m, 8);
    assert.ok((await readThrough(m.mountpoint, false, m.dir)).equals(m.ref));
  });

  test('a qcow2 export does not qualify and says why', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse', 'dd')) return;
    const m = await mountRaw(t, { writable: false, growable: false, format: 'qcow2' });
    assert.deepEqual(m.exp.passthrough, {
      active: false,
      why: 'node',
      reason: "the node is 'qcow2', not raw over a file",
    });
    assert.ok((await readThrough(m.mountpoint, false, m.dir)).equals(m.ref));
    assert.ok(m.exp.stats.reads > 0);
  });

  test('the connection handed to a successor carries the backing id (FUSE_PASSTHROUGH negotiated)', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
    const m = await mountRaw(t, { writable: false, growable: false });
    const c = m.exp.connection();
    assert.ok(c);
    closeSync(c.fd); // only the record is wanted here
    const pt = m.exp.passthrough;
    assert.ok(pt.active);
    assert.equal(c.init.backingId, pt.backingId);
    assert.ok(c.init.flags2 & (1 << 5), 'FUSE_PASSTHROUGH (flags2 bit 5) answered at INIT');
  });

  test('without CAP_SYS_ADMIN in the initial namespace the kernel refuses the backing file (EPERM): one line says so, the export works', async (t) => {
    if (!needTools(t, 'qemu-img', '/dev/fuse', 'unshare', 'cmp')) return;
    const dir = mkdtempSync(join(tmpdir(), 'blkexport-pt-'));
    let pid = 0;
    t.after(() => {
      try {
        // Only our server (still running after a failure), never a process that reused its pid.
        if (pid > 0 && readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(dir))
          process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
    const image = join(dir, 'disk.raw');
    qemuImg('create', '-q', '-f', 'raw', image, String(SIZE));
    writeFileSync(image, randomBytes(seededRandom(5), SIZE));
    const mnt = join(dir, 'export');
    writeFileSync(mnt, '');
    // A user namespace: root there may mount FUSE, but is not CAP_SYS_ADMIN where passthrough asks.
    const script = `"${BIN}" mount "${image}" "${mnt}" --format raw --daemonize && cmp "${mnt}" "${image}" && echo same; "${BIN}" umount "${mnt}"`;
    const r = run('unshare', ['-U', '-r', '-m', '--propagation', 'private', 'sh', '-c', script], {
      timeoutMs: 60_000,
    });
    const m = /\(pid (\d+)\)/.exec(r.stdout);
    if (m) pid = Number(m[1]);
    assert.match(
      r.stdout,
      /read-only \(no FUSE passthrough: registering the image file needs CAP_SYS_ADMIN \(run as root\)\)/,
    );
    assert.match(r.stdout, /^same$/m, r.stdout + r.stderr);
    assert.equal(r.status, 0, r.stderr);
  });
});
