/**
 * The processes of fuse-handover.test.ts, one role each (argv[2]), all run
 * with `node --import tsx`:
 *
 *   serve CONFIG   a server generation: mounts (generation 0) or adopts the
 *                  connection its predecessor passed as fd 3, once fd 4 (a pipe
 *                  whose other end only the predecessor holds) reports EOF,
 *                  that is once the predecessor is gone. SIGUSR2: start the
 *                  successor, then hold every read and write (never answer
 *                  them). SIGTERM: unmount, wait for the end, exit.
 *   reader CONFIG  reads the seeded region with O_DIRECT in a loop and checks
 *                  every byte; stops when CONFIG.stop exists.
 *   writer CONFIG  writes seeded blocks with O_DIRECT and reads each back.
 *
 * Every process reports on stdout, one line per event ("gen=1 serving",
 * "reader n=40", "held=2 gen=0", a final JSON line for reader and writer). A
 * successor inherits its predecessor's stdout, so the test reads every
 * generation from the pipe of generation 0.
 */
import { spawn } from 'node:child_process';
import { closeSync, constants, existsSync, openSync, readSync, writeSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { Socket } from 'node:net';
import { fileURLToPath } from 'node:url';
import { BlkError, Errno } from '../../src/errors.js';
import type { FileFsMount, FileFsOps, FuseInit } from '../../src/export/fuse/file-fs.js';
import { adoptFileFsFuse3, mountFileFsFuse3 } from '../../src/export/fuse/fuse3.js';
import { seededRandom } from '../helpers/tools.js';

export const BLOCK = 4096;
export const MiB = 1024 * 1024;

/** The bytes of block `index` at `version`: 4 KiB from a PRNG seeded by both (version 0: the seeded image). */
export function blockPattern(index: number, version: number): Buffer {
  const rand = seededRandom((index * 2654435761 + version * 40503 + 1) >>> 0);
  const b = Buffer.allocUnsafe(BLOCK);
  for (let i = 0; i < BLOCK; i += 4) b.writeUInt32LE((rand() * 4294967296) >>> 0, i);
  return b;
}

export interface ServeConfig {
  mnt: string;
  img: string;
  gen: number;
  /** Whether successors ask the kernel to resend what their predecessor held. */
  resend: boolean;
  /** [0, fastBytes) is installed in the native fast path once serving. */
  fastBytes: number;
  /** Set for a successor: what its predecessor's connection() said. */
  init?: FuseInit;
}

export interface LoopConfig {
  path: string;
  stop: string;
  /** The region read (reader) or written (writer), in bytes. */
  from: number;
  to: number;
  seed: number;
}

const say = (line: string) => process.stdout.write(`${line}\n`);

/** Resolves when the predecessor is gone: its end of our fd 4 closes with its last descriptor. */
function predecessorGone(): Promise<void> {
  return new Promise((resolve) => {
    const s = new Socket({ fd: 4, readable: true, writable: false });
    s.on('error', () => undefined);
    s.on('close', () => resolve());
    s.resume();
  });
}

async function serve(cfg: ServeConfig): Promise<void> {
  const tag = `gen=${cfg.gen}`;
  const img = await open(cfg.img, 'r+');
  const size = 8 * MiB;
  let holding = false;
  let held = 0;
  const hold = () => {
    held++;
    say(`held=${held} ${tag}`);
    return new Promise<number>(() => undefined);
  };
  const ops: FileFsOps = {
    getattr: async () => {
      const now = new Date();
      return { mode: 0o100600, uid: 0, gid: 0, size, blocks: size / 512, mtime: now, atime: now, ctime: now };
    },
    open: () => undefined,
    read: async (buf, length, position) => {
      if (holding) return hold();
      return (await img.read(buf, 0, Math.min(length, Math.max(0, size - position)), position)).bytesRead;
    },
    write: async (buf, length, position) => {
      if (holding) return hold();
      return (await img.write(buf, 0, length, position)).bytesWritten;
    },
    truncate: async () => {
      throw new BlkError('ERRNO', 'fixed size', {}, { errno: Errno.EPERM });
    },
    chmod: () => undefined,
    chown: () => undefined,
    utimens: () => undefined,
    flush: async () => undefined,
    fsync: () => img.sync(),
  };

  let m: FileFsMount;
  if (cfg.init) {
    say(`${tag} waiting pid=${process.pid}`);
    await predecessorGone();
    m = await adoptFileFsFuse3(3, cfg.init, ops, { mountpoint: cfg.mnt, resend: cfg.resend });
  } else {
    m = await mountFileFsFuse3(cfg.mnt, ops, {
      readOnly: false,
      allowOther: false,
      fsname: `blkexport-handover:${process.pid}`,
      subtype: 'blkexport',
      maxRead: MiB,
    });
  }
  // The fast path starts without a size (every read goes to JavaScript) until told one.
  m.fast!.invalidate(0, 0, size);
  if (cfg.fastBytes > 0) m.fast!.install(m.fast!.gen(), 0, [{ length: cfg.fastBytes, fd: img.fd, host: 0 }]);
  say(`${tag} serving pid=${process.pid}`);
  m.ended!.then(() => say(`${tag} ended`));

  process.on('SIGUSR2', () => {
    const { fd: conn, init } = m.connection!();
    const next: ServeConfig = { ...cfg, gen: cfg.gen + 1, init };
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', fileURLToPath(import.meta.url), 'serve', JSON.stringify(next)],
      {
        stdio: ['ignore', 'inherit', 'inherit', conn, 'pipe'],
      },
    );
    closeSync(conn);
    // Keep our end of the pipe open until we die: its EOF tells the successor we are gone.
    (globalThis as { successor?: unknown }).successor = child;
    say(`${tag} handing-over successor=${child.pid} kernelResend=${init.resend}`);
    holding = true;
  });
  process.on('SIGTERM', async () => {
    say(`${tag} fast=${JSON.stringify(m.fast!.stats())}`);
    await m.unmount();
    say(`${tag} unmounted`);
    // unmount() unrefs the binding (open descriptors must not keep a process alive): stay until the end.
    const alive = setInterval(() => undefined, 1000);
    await Promise.race([m.ended, new Promise((r) => setTimeout(r, 15_000))]);
    clearInterval(alive);
    process.exit(0);
  });
}

/** The reader: random O_DIRECT reads of [from, to), checked against the seeded blocks. */
function reader(cfg: LoopConfig): void {
  const rand = seededRandom(cfg.seed);
  const fd = openSync(cfg.path, constants.O_RDONLY | constants.O_DIRECT);
  const buf = Buffer.alloc(32 * BLOCK);
  const blocks = (cfg.to - cfg.from) / BLOCK;
  let n = 0;
  let errors = 0;
  let mismatches = 0;
  const firstErrors: string[] = [];
  while (!existsSync(cfg.stop)) {
    const count = 1 + Math.floor(rand() * 32);
    const first = Math.floor(rand() * (blocks - count + 1));
    try {
      const got = readSync(fd, buf, 0, count * BLOCK, cfg.from + first * BLOCK);
      if (got !== count * BLOCK) throw new Error(`short read ${got} of ${count * BLOCK}`);
      for (let i = 0; i < count; i++) {
        const want = blockPattern(cfg.from / BLOCK + first + i, 0);
        if (!buf.subarray(i * BLOCK, (i + 1) * BLOCK).equals(want)) mismatches++;
      }
    } catch (e) {
      errors++;
      const msg = (e as NodeJS.ErrnoException).code ?? String(e);
      if (firstErrors.length < 5) firstErrors.push(msg);
      say(`reader error ${msg}`);
    }
    n++;
    if (n % 20 === 0) say(`reader n=${n}`);
  }
  say(JSON.stringify({ role: 'reader', n, errors, mismatches, firstErrors }));
}

/** The writer: seeded blocks written with O_DIRECT to [from, to), each read back; reports every block's version. */
function writer(cfg: LoopConfig): void {
  const rand = seededRandom(cfg.seed);
  const fd = openSync(cfg.path, constants.O_RDWR | constants.O_DIRECT);
  const blocks = (cfg.to - cfg.from) / BLOCK;
  const versions: Record<number, number> = {};
  const back = Buffer.alloc(16 * BLOCK);
  let n = 0;
  let errors = 0;
  let mismatches = 0;
  const firstErrors: string[] = [];
  while (!existsSync(cfg.stop)) {
    const count = 1 + Math.floor(rand() * 16);
    const first = Math.floor(rand() * (blocks - count + 1));
    const version = n + 1;
    const index = (i: number) => cfg.from / BLOCK + first + i;
    const data = Buffer.concat(Array.from({ length: count }, (_, i) => blockPattern(index(i), version)));
    try {
      const put = writeSync(fd, data, 0, data.length, cfg.from + first * BLOCK);
      if (put !== data.length) throw new Error(`short write ${put} of ${data.length}`);
      for (let i = 0; i < count; i++) versions[index(i)] = version;
      const got = readSync(fd, back, 0, data.length, cfg.from + first * BLOCK);
      if (got !== data.length || !back.subarray(0, got).equals(data)) mismatches++;
    } catch (e) {
      errors++;
      const msg = (e as NodeJS.ErrnoException).code ?? String(e);
      if (firstErrors.length < 5) firstErrors.push(msg);
      say(`writer error ${msg}`);
    }
    n++;
    if (n % 10 === 0) say(`writer n=${n}`);
  }
  say(JSON.stringify({ role: 'writer', n, errors, mismatches, firstErrors, versions }));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [role, json] = process.argv.slice(2);
  const cfg = JSON.parse(json ?? '{}');
  if (role === 'serve') {
    serve(cfg as ServeConfig).catch((e) => {
      say(`gen=${(cfg as ServeConfig).gen} failed ${(e as Error).message}`);
      process.exit(1);
    });
  } else if (role === 'reader') reader(cfg as LoopConfig);
  else if (role === 'writer') writer(cfg as LoopConfig);
  else {
    process.stderr.write(`unknown role '${role}'\n`);
    process.exit(2);
  }
}
