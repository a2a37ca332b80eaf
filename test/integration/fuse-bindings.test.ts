/**
 * Both FUSE bindings, and the libfuse 3 binding's native read fast path under
 * writes: O_DIRECT reads (which reach the export, not the page cache) must
 * always see the latest acknowledged writes, truncates and hole punches.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, test } from 'node:test';
import { cleanupMountsUnder } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, randomBytes, run, runOk, seededRandom, tempDir } from '../helpers/tools.js';

const K = 1024;

function blk(env: NodeJS.ProcessEnv, ...args: string[]) {
  return run(BIN, args, { env: { ...process.env, ...env }, timeoutMs: 60_000 });
}

/** Reads [off, off+len) with O_DIRECT from a child process (4 KiB aligned). */
function directRead(path: string, off: number, len: number): Buffer {
  const out = join(dirname(path), 'read.bin');
  runOk('dd', [
    `if=${path}`,
    `of=${out}`,
    'bs=4096',
    `skip=${off / 4096}`,
    `count=${len / 4096}`,
    'iflag=direct',
    'status=none',
  ]);
  return readFileSync(out);
}

function directWrite(path: string, off: number, data: Buffer, dir: string): void {
  const f = join(dir, 'chunk');
  writeFileSync(f, data);
  runOk('dd', [
    `if=${f}`,
    `of=${path}`,
    'bs=4096',
    `seek=${off / 4096}`,
    'oflag=direct',
    'conv=notrunc',
    'status=none',
  ]);
}

for (const binding of ['fuse3', 'fuse-native'] as const) {
  describe(`FUSE binding ${binding}`, { concurrency: false }, () => {
    const env = { BLKEXPORT_FUSE: binding };

    test('reads after writes, a hole punch and a grow see the latest bytes', (t) => {
      if (!needTools(t, 'qemu-img', '/dev/fuse', 'fallocate')) return;
      const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
      const img = join(dir, 'disk.raw');
      const size = 4 * 1024 * K;
      const ref = randomBytes(seededRandom(5), size);
      writeFileSync(img, ref);
      const m = blk(env, 'mount', img, '--writable', '--growable', '--format', 'raw', '--daemonize');
      assert.equal(m.status, 0, m.stderr);
      const rand = seededRandom(6);
      const pick = (max: number) => Math.floor(rand() * (max / 4096)) * 4096;
      // Warm every granule (the fast path learns from reads served by JavaScript), then interleave writes and reads.
      assert.ok(directRead(img, 0, size).equals(ref));
      for (let i = 0; i < 40; i++) {
        const off = pick(size - 64 * K);
        const len = 4096 * (1 + Math.floor(rand() * 16));
        const data = randomBytes(rand, len);
        directWrite(img, off, data, dir);
        data.copy(ref, off);
        const roff = pick(size - 128 * K);
        assert.ok(
          directRead(img, roff, 128 * K).equals(ref.subarray(roff, roff + 128 * K)),
          `read ${i} at ${roff}`,
        );
      }
      if (binding === 'fuse3') {
        // fallocate reaches the export only through our libfuse 3 binding.
        runOk('fallocate', ['-p', '-o', String(64 * K), '-l', String(128 * K), img]);
        ref.fill(0, 64 * K, 192 * K);
        runOk('fallocate', ['-l', String(size + 64 * K), img]);
        assert.equal(statSync(img).size, size + 64 * K);
      }
      assert.ok(directRead(img, 0, size).equals(ref));
      assert.equal(blk(env, 'umount', img).status, 0);
      assert.ok(readFileSync(img).subarray(0, size).equals(ref));
    });

    if (binding === 'fuse3') {
      test('the binding threads that read /dev/fuse take no signals (a cancelled one would keep libuv signal lock)', (t) => {
        if (!needTools(t, 'qemu-img', '/dev/fuse')) return;
        const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
        const img = join(dir, 'disk.qcow2');
        qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
        const pidfile = join(dir, 'pid');
        assert.equal(blk(env, 'mount', img, '--daemonize', '--pidfile', pidfile).status, 0);
        const pid = readFileSync(pidfile, 'utf8').trim();
        // The pool's workers are named blk-fuse (fuse_loop.c); idle, they wait in epoll_wait.
        const fuseThreads = readdirSync(`/proc/${pid}/task`).filter(
          (tid) => readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim() === 'blk-fuse',
        );
        assert.ok(fuseThreads.length > 0, 'the worker threads that read /dev/fuse');
        const SIGCHLD = 17n;
        const SIGTERM = 15n;
        for (const tid of fuseThreads) {
          const status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
          const blocked = BigInt(`0x${/^SigBlk:\s+([0-9a-f]+)$/m.exec(status)![1]}`);
          for (const sig of [SIGCHLD, SIGTERM])
            assert.ok(
              blocked & (1n << (sig - 1n)),
              `thread ${tid} blocks signal ${sig} (SigBlk ${blocked.toString(16)})`,
            );
        }
        assert.equal(blk(env, 'umount', img).status, 0);
      });

      test('lseek SEEK_DATA / SEEK_HOLE follow the block status; ENXIO past the end', (t) => {
        if (!needTools(t, 'qemu-img', 'qemu-io', '/dev/fuse', 'python3')) return;
        const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
        const img = join(dir, 'sparse.qcow2');
        qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
        run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 1M 64k', '-c', 'write -P 2 3M 512k', img]);
        assert.equal(blk(env, 'mount', img, '--daemonize').status, 0);
        const script = [
          'import os, sys',
          'fd = os.open(sys.argv[1], os.O_RDONLY)',
          'for off in map(int, sys.argv[2:]):',
          '  for wh in (os.SEEK_DATA, os.SEEK_HOLE):',
          '    try: print(os.lseek(fd, off, wh))',
          '    except OSError as e: print(-e.errno)',
        ].join('\n');
        const out = runOk('python3', ['-c', script, img, '0', '1100000', '2000000', '3500000', '4194304']);
        const M = 1024 * 1024;
        assert.deepEqual(out.trim().split('\n').map(Number), [
          ...[M, 0], // data starts at 1 MiB; 0 is a hole
          ...[1100000, M + 64 * K], // inside the data; the hole after it
          ...[3 * M, 2000000], // the next data; a hole here
          ...[3500000, 3 * M + 512 * K],
          ...[-6, -6], // ENXIO at the end
        ]);
        assert.equal(blk(env, 'umount', img).status, 0);
      });
    }

    test('a qcow2 over a backing file reads identically to qemu-img convert', (t) => {
      if (!needTools(t, 'qemu-img', 'qemu-io', '/dev/fuse')) return;
      const dir = tempDir(t, 'blkexport-test-', cleanupMountsUnder);
      const base = join(dir, 'base.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', base, '8M');
      run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 3M', '-c', 'write -P 0x22 5M 1M', base]);
      const top = join(dir, 'top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '8M');
      run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 1M 1M', '-c', 'write -z 5M 512k', top]);
      const rawRef = join(dir, 'ref.raw');
      qemuImg('convert', '-O', 'raw', top, rawRef);
      const mnt = join(dir, 'mnt');
      writeFileSync(mnt, '');
      assert.equal(blk(env, 'mount', top, mnt, '--daemonize').status, 0);
      const want = readFileSync(rawRef);
      for (let pass = 0; pass < 2; pass++)
        assert.ok(directRead(mnt, 0, want.length).equals(want), `pass ${pass}`);
      assert.equal(blk(env, 'umount', mnt).status, 0);
    });
  });
}
