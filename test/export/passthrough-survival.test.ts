/**
 * A file opened in passthrough keeps reading and writing the image while no
 * server exists (docs/fuse-export.md, "Passthrough", exports that outlive the
 * agent): the server hands its /dev/fuse descriptor to a holder and is
 * SIGKILLed; a client that had the export open then reads it whole and writes
 * a block, which needs no server at all. Without passthrough those reads
 * would wait for a server that never comes (the test's deadline fails it).
 * Then a successor adopts the connection and serves new opens with the same
 * backing id while the first client still has the file open.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { cleanupMountsUnder } from '../helpers/mounts.js';
import { needTools, qemuImg, randomBytes, seededRandom } from '../helpers/tools.js';

const SIZE = 4 * 1024 * 1024;
const CHILD = new URL('./passthrough-server-child.ts', import.meta.url).pathname;

/**
 * Opens the export and writes a block while the server is alive (a
 * connection's first passthrough write asks the server once for
 * security.capability; it answers ENOSYS and the kernel never asks again),
 * says `open`, waits for a line, then writes another block, reads it back
 * and reads the whole file.
 */
const CLIENT = `
import os, sys, hashlib
path, size, off = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
block = bytes((i * 7 + 3) & 0xff for i in range(4096))
assert os.pwrite(fd, block, 0) == 4096
print("open", flush=True)
sys.stdin.readline()
assert os.pwrite(fd, block, off) == 4096
assert os.pread(fd, 4096, off) == block
h = hashlib.sha256()
pos = 0
while pos < size:
    chunk = os.pread(fd, 1 << 20, pos)
    assert chunk, pos
    h.update(chunk)
    pos += len(chunk)
print("ok", h.hexdigest(), flush=True)
sys.stdin.readline()
`;

/** The next line a child prints, or a rejection after `ms`. */
function nextLine(child: ChildProcess, ms: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => {
      child.stdout!.off('data', onData);
      reject(new Error(`no line from pid ${child.pid} within ${ms} ms (got '${buf}')`));
    }, ms);
    const onData = (d: Buffer) => {
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      child.stdout!.off('data', onData);
      resolve(buf.slice(0, nl));
    };
    child.stdout!.on('data', onData);
  });
}

test('files open in passthrough keep reading and writing the image after the server is SIGKILLed', async (t) => {
  if (!needTools(t, 'qemu-img', '/dev/fuse', 'python3', 'sleep')) return;
  const dir = mkdtempSync(join(tmpdir(), 'blkexport-pts-'));
  let holderPid = 0;
  let successorPid = 0;
  const children: ChildProcess[] = [];
  // One after-hook, in order: the holder and the successor (the connection ends, anything waiting
  // on it fails), the children, stray mounts, the files.
  t.after(() => {
    try {
      for (const pid of [holderPid, successorPid, ...children.map((c) => c.pid ?? 0)]) {
        if (pid > 0) {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // gone already
          }
        }
      }
      cleanupMountsUnder(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  const image = join(dir, 'disk.raw');
  qemuImg('create', '-q', '-f', 'raw', image, String(SIZE));
  const ref = randomBytes(seededRandom(77), SIZE);
  writeFileSync(image, ref);
  const mnt = join(dir, 'export');
  writeFileSync(mnt, '');

  const server = spawn(process.execPath, ['--import', 'tsx', CHILD, 'mount', image, mnt], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  children.push(server);
  const ready = await nextLine(server, 30_000);
  const m = /^ready (\d+) (.*)$/.exec(ready);
  assert.ok(m, ready);
  holderPid = Number(m[1]);
  const status = JSON.parse(m[2]!) as { active: boolean };
  assert.equal(status.active, true, m[2]);

  const off = 1024 * 1024 + 8192;
  const client = spawn('python3', ['-c', CLIENT, mnt, String(SIZE), String(off)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  children.push(client);
  assert.equal(await nextLine(client, 10_000), 'open');

  const gone = new Promise((r) => server.once('exit', r));
  server.kill('SIGKILL');
  await gone;

  client.stdin!.write('go\n');
  const done = await nextLine(client, 10_000);
  for (let i = 0; i < 4096; i++) ref[i] = ref[off + i] = (i * 7 + 3) & 0xff;
  const sum = `ok ${createHash('sha256').update(ref).digest('hex')}`;
  assert.equal(done, sum);
  assert.ok(readFileSync(image).equals(ref), 'the block is in the image file');

  // A successor adopts the connection from the holder and answers new opens with the first
  // server's backing id: the old descriptor is still open in passthrough, so another id for
  // the same file would be refused (the open would fail with EIO).
  process.kill(holderPid, 'SIGUSR2');
  const adopted = /^adopted (\d+) (.*)$/.exec(await nextLine(server, 30_000));
  assert.ok(adopted);
  successorPid = Number(adopted[1]);
  const second = spawn('python3', ['-c', CLIENT, mnt, String(SIZE), String(off)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  children.push(second);
  assert.equal(await nextLine(second, 10_000), 'open');
  second.stdin!.write('go\n');
  assert.equal(await nextLine(second, 10_000), sum);
  assert.deepEqual(JSON.parse(adopted[2]!), status);
});
