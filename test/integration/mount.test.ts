/**
 * `blkexport mount` / `umount` end to end: real FUSE mounts, images made by
 * qemu-img, every check from another process (never the serving one).
 * Covers the seed's intro example and the single-export cases of QEMU's iotest 308.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { cleanupMountsUnder, mountsUnder } from '../helpers/mounts.js';
import { BIN, needTools, qemuImg, randomBytes, run, runOk, seededRandom, tempDir } from '../helpers/tools.js';

const TOOLS = ['qemu-img', '/dev/fuse', 'parted', 'sfdisk', 'file'];

/** A temp dir whose mounts and serving processes are cleaned up even when the test fails. */
function workDir(t: Parameters<typeof tempDir>[0]): string {
  return tempDir(t, 'blkexport-test-', cleanupMountsUnder);
}

function blk(...args: string[]) {
  return run(BIN, args, { timeoutMs: 60_000 });
}

function fileType(path: string): string {
  return runOk('file', ['-b', path]).trim();
}

function sh(script: string) {
  return run('sh', ['-c', script]);
}

describe('blkexport mount', { concurrency: false }, () => {
  test('the seed intro example: a partitioned qcow2 looks raw while mounted on itself', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = workDir(t);
    const raw = join(dir, 'foo.img');
    const img = join(dir, 'foo.qcow2');
    qemuImg('create', '-f', 'raw', raw, '1G');
    runOk('parted', ['-s', raw, 'mklabel msdos', 'mkpart primary ext4 2048s 100%']);
    qemuImg('convert', '-p', '-f', 'raw', '-O', 'qcow2', raw, img);
    run('rm', [raw]);
    assert.match(fileType(img), /QEMU QCOW/);

    const m = blk('mount', img, '--daemonize');
    assert.equal(m.status, 0, m.stderr);
    assert.match(m.stdout, /exported .*foo\.qcow2 \(qcow2\) on .*foo\.qcow2/);
    const type = fileType(img);
    assert.match(type, /DOS\/MBR boot sector/);
    assert.match(type, /startsector 2048/);
    const dump = runOk('sfdisk', ['-d', img]);
    assert.match(dump, /start=\s*2048, size=\s*2095104, type=83/);
    assert.equal(statSync(img).size, 1024 ** 3);

    const u = blk('umount', img);
    assert.equal(u.status, 0, u.stderr);
    assert.equal(mountsUnder(dir).length, 0);
    assert.match(fileType(img), /QEMU QCOW/);
    assert.equal(run('qemu-img', ['check', img]).status, 0);
  });

  test('missing and directory mountpoints are refused with QEMU wording', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = workDir(t);
    const img = join(dir, 'a.raw');
    qemuImg('create', '-f', 'raw', img, '1M');
    const missing = blk('mount', img, join(dir, 'nope'), '--daemonize');
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /Failed to stat '.*\/nope': No such file or directory/);
    mkdirSync(join(dir, 'd'));
    const isDir = blk('mount', img, join(dir, 'd'), '--daemonize');
    assert.equal(isDir.status, 1);
    assert.match(isDir.stderr, /'.*\/d' is not a regular file/);
    assert.equal(mountsUnder(dir).length, 0);
  });

  test('--daemonize of an image whose first L2 table is unreadable names the image and the table', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = workDir(t);
    const img = join(dir, 'bad.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    run('qemu-io', ['-c', 'write -P 0xab 0 64k', img]);
    // L1 entry 0 (COPIED) pointed 1 TiB into a file of a few hundred KiB.
    const buf = readFileSync(img);
    const l1 = Number(buf.readBigUInt64BE(40));
    buf.writeBigUInt64BE((1n << 63n) | (1n << 40n), l1);
    writeFileSync(img, buf);
    const m = blk('mount', img, '--daemonize');
    assert.equal(m.status, 1, m.stderr);
    assert.match(
      m.stderr,
      /'.*bad\.qcow2' is mounted on '.*bad\.qcow2' but not readable: .*L1 entry 0: L2 table at 1099511627776 lies beyond the end of the file/,
    );
    assert.doesNotMatch(m.stderr, /Input\/output error/);
    assert.deepEqual(mountsUnder(dir), []);
  });

  test('read-only export: identical bytes, mode 0400, size rounded to 512, writes and chmod +w refused', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = workDir(t);
    const img = join(dir, 'ro.raw');
    const data = randomBytes(seededRandom(308), 1048580);
    writeFileSync(img, data);
    const mnt = join(dir, 'mnt');
    writeFileSync(mnt, '');
    const m = blk('mount', img, mnt, '--daemonize');
    assert.equal(m.status, 0, m.stderr);

    // Before any read: a short read at EOF makes the kernel shrink its cached size (as with QSD).
    assert.equal(runOk('stat', ['-c', '%a %s', mnt]).trim(), '400 1049088');
    assert.equal(sh(`cmp '${img}' '${mnt}'`).status, 0, 'export differs from the image');
    assert.notEqual(sh(`dd if=/dev/zero of='${mnt}' bs=512 count=1 conv=notrunc status=none`).status, 0);
    assert.notEqual(run('chmod', ['u+w', mnt]).status, 0);
    assert.notEqual(run('touch', [mnt]).status, 0, 'utimens must be refused');
    // A second export on the same mountpoint is refused.
    const twice = blk('mount', img, mnt, '--daemonize');
    assert.equal(twice.status, 1);
    assert.match(twice.stderr, /There already is a FUSE export on '.*\/mnt'/);

    assert.equal(blk('umount', mnt).status, 0);
    assert.equal(statSync(mnt).size, 0, 'the original file shows again after unmount');
    assert.deepEqual(readFileSync(img), data);
  });

  test('an export over the image itself reads concurrently with a second export of the same image', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = workDir(t);
    const img = join(dir, 'self.raw');
    const data = randomBytes(seededRandom(7), 4 * 1024 * 1024);
    writeFileSync(img, data);
    const ref = join(dir, 'ref.raw');
    copyFileSync(img, ref);
    const other = join(dir, 'other');
    writeFileSync(other, '');
    assert.equal(blk('mount', img, other, '--daemonize').status, 0);
    assert.equal(blk('mount', img, '--daemonize').status, 0);
    const both = sh(`cmp '${ref}' '${img}' & a=$!; cmp '${ref}' '${other}' & b=$!; wait $a && wait $b`);
    assert.equal(both.status, 0, both.stdout + both.stderr);
    assert.equal(blk('umount', img).status, 0);
    assert.equal(blk('umount', other).status, 0);
    assert.equal(sh(`cmp '${ref}' '${img}'`).status, 0);
  });

  test('writable raw export: writes land, writes past EOF fail, size changes need growable', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = workDir(t);
    const img = join(dir, 'w.raw');
    qemuImg('create', '-f', 'raw', img, '1M');
    const probed = blk('mount', img, '--writable', '--daemonize');
    assert.equal(probed.status, 1, 'a probed-raw image is not writable without --format raw');
    assert.match(probed.stderr, /--format raw/);

    assert.equal(blk('mount', img, '--writable', '--format', 'raw', '--daemonize').status, 0);
    assert.equal(runOk('stat', ['-c', '%a', img]).trim(), '600');
    const patch = randomBytes(seededRandom(1), 65536);
    writeFileSync(join(dir, 'patch'), patch);
    assert.equal(
      sh(`dd if='${dir}/patch' of='${img}' bs=64k seek=3 conv=notrunc,fsync status=none`).status,
      0,
    );
    // Not growable: a write wholly past EOF writes nothing and fails (dd: 0+0 records out).
    const past = sh(`dd if=/dev/zero of='${img}' bs=512 seek=2048 count=1 conv=notrunc`);
    assert.notEqual(past.status, 0);
    assert.match(past.stderr, /0\+0 records out/);
    assert.notEqual(run('truncate', ['-s', '0', img]).status, 0, 'truncate without growable');
    assert.equal(statSync(img).size, 1024 * 1024);
    assert.equal(blk('umount', img).status, 0);

    const after = readFileSync(img);
    assert.equal(after.length, 1024 * 1024);
    assert.deepEqual(after.subarray(3 * 65536, 4 * 65536), patch);
    assert.equal(
      after.subarray(0, 3 * 65536).every((b) => b === 0),
      true,
    );
  });

  test('growable export grows on writes past EOF and by truncate, and shrinks back', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = workDir(t);
    const img = join(dir, 'g.raw');
    qemuImg('create', '-f', 'raw', img, '1M');
    assert.equal(blk('mount', img, '--writable', '--growable', '--format', 'raw', '--daemonize').status, 0);
    assert.equal(sh(`dd if=/dev/zero of='${img}' bs=64k seek=16 count=1 conv=notrunc status=none`).status, 0);
    assert.equal(statSync(img).size, 1024 * 1024 + 65536);
    assert.equal(run('truncate', ['-s', '+64K', img]).status, 0);
    assert.equal(statSync(img).size, 1024 * 1024 + 2 * 65536);
    assert.equal(run('truncate', ['-s', '1M', img]).status, 0);
    assert.equal(statSync(img).size, 1024 * 1024);
    // Writing zeroes over the whole image reads back zeroes.
    assert.equal(sh(`dd if=/dev/zero of='${img}' bs=64k count=16 conv=notrunc,fsync status=none`).status, 0);
    assert.equal(blk('umount', img).status, 0);
    assert.equal(statSync(img).size, 1024 * 1024);
    assert.equal(
      readFileSync(img).every((b) => b === 0),
      true,
    );
  });

  test('foreground mount serves until SIGTERM, then flushes, unmounts and exits 0', async (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = workDir(t);
    const img = join(dir, 'fg.raw');
    writeFileSync(img, randomBytes(seededRandom(3), 1 << 20));
    const pidfile = join(dir, 'pid');
    const child = spawn(BIN, ['mount', img, '--pidfile', pidfile], { stdio: ['ignore', 'pipe', 'pipe'] });
    t.after(() => child.kill('SIGKILL'));
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
    });
    const exited = new Promise<number | null>((res) => child.on('exit', (code) => res(code)));
    for (let i = 0; i < 200 && !out.includes('Ctrl-C'); i++) await new Promise((r) => setTimeout(r, 50));
    assert.match(
      out,
      /exported .*fg\.raw \(raw\) on .*fg\.raw as raw, 1 MiB .*read-only( \(.*\))?; Ctrl-C to stop/,
    );
    assert.equal(readFileSync(pidfile, 'utf8').trim(), String(child.pid));
    assert.equal(mountsUnder(dir).length, 1);
    child.kill('SIGTERM');
    assert.equal(await exited, 0);
    assert.equal(mountsUnder(dir).length, 0);
    assert.equal(existsSync(pidfile), false, 'pidfile removed at exit');
  });

  test('umount cleans a stale mount whose serving process was killed', (t) => {
    if (!needTools(t, ...TOOLS)) return;
    const dir = workDir(t);
    const img = join(dir, 's.raw');
    qemuImg('create', '-f', 'raw', img, '1M');
    const pidfile = join(dir, 'pid');
    assert.equal(blk('mount', img, '--daemonize', '--pidfile', pidfile).status, 0);
    const pid = Number(readFileSync(pidfile, 'utf8'));
    process.kill(pid, 'SIGKILL');
    // The kernel aborts the connection once the process is gone; wait for that, not just for the signal.
    const alive = () => {
      try {
        return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
      } catch {
        return false;
      }
    };
    for (let i = 0; i < 200 && alive(); i++) sh('sleep 0.02');
    const stale = sh(`stat '${img}'`);
    assert.notEqual(stale.status, 0);
    assert.match(stale.stderr, /Transport endpoint is not connected|Software caused connection abort/);
    const u = blk('umount', img);
    assert.equal(u.status, 0, u.stderr);
    assert.match(u.stdout, /cleaned stale mount/);
    assert.equal(mountsUnder(dir).length, 0);
    assert.equal(statSync(img).size, 1024 * 1024);
  });

  test('--partition exports one partition: an ext4 filesystem inside a qcow2 loop-mounts and reads back', (t) => {
    if (!needTools(t, ...TOOLS, 'mkfs.ext4', 'losetup')) return;
    const dir = workDir(t);
    const tree = join(dir, 'tree');
    mkdirSync(tree);
    writeFileSync(join(tree, 'hello.txt'), 'hello from partition 1\n');
    const part = join(dir, 'part.ext4');
    runOk('mkfs.ext4', ['-q', '-F', '-d', tree, part, '16M']);
    const disk = join(dir, 'disk.raw');
    qemuImg('create', '-f', 'raw', disk, '32M');
    runOk('parted', ['-s', disk, 'mklabel msdos', 'mkpart primary ext4 2048s 34815s']);
    runOk('dd', [`if=${part}`, `of=${disk}`, 'bs=512', 'seek=2048', 'conv=notrunc', 'status=none']);
    const img = join(dir, 'disk.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', disk, img);

    const mnt = join(dir, 'p1.raw');
    const m = blk('mount', img, mnt, '--partition', '1', '--create-mountpoint', '--daemonize');
    assert.equal(m.status, 0, m.stderr);
    assert.match(m.stdout, /partition 1 \(mbr, offset 1048576\)/);
    assert.equal(statSync(mnt).size, 16 * 1024 * 1024);
    assert.equal(sh(`cmp '${part}' '${mnt}'`).status, 0);
    const fsdir = join(dir, 'fs');
    mkdirSync(fsdir);
    const lm = run('mount', ['-o', 'loop,ro', mnt, fsdir]);
    assert.equal(lm.status, 0, lm.stderr);
    try {
      assert.equal(readFileSync(join(fsdir, 'hello.txt'), 'utf8'), 'hello from partition 1\n');
    } finally {
      run('umount', [fsdir]);
    }
    assert.equal(blk('umount', mnt).status, 0);
    assert.equal(existsSync(mnt), false, 'a created mountpoint is removed at unmount');
    assert.equal(
      blk('mount', img, join(dir, 'p9'), '--partition', '9', '--create-mountpoint', '--daemonize').status,
      1,
    );
  });
});
