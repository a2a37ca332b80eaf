/**
 * The ways the benchmark reaches the same guest disk: qemu-storage-daemon's
 * FUSE export of the image, blkexport's FUSE export of it (through the
 * `blkexport mount --daemonize` / `umount` CLI), the raw twin as a plain
 * host file, and for O_DIRECT rows the raw twin read through the host page
 * cache (the cache mode both exports use for the image file). Each export
 * registers its undo step before it starts anything.
 */
import { existsSync } from 'node:fs';
import { open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BlkError, describeError } from '../src/errors.js';
import type { Cleanup } from './cleanup.js';
import type { ImagePair } from './images.js';
import { isMounted, runCommand, startServer, unmountIfMounted, waitExit, waitUntil } from './proc.js';
import type { ImageFormat } from './workloads.js';

export type ServerId = 'qsd' | 'blkexport' | 'plain' | 'plain-cached';

export const SERVER_IDS: readonly ServerId[] = ['qsd', 'blkexport', 'plain', 'plain-cached'];

/** A disk being served: fio runs on `path`; `stop` unmounts and ends the server (idempotent). */
export interface Exported {
  path: string;
  stop(): Promise<void>;
  /** The serving process, whose CPU time the report divides by the bytes moved (none for the host file). */
  pid?: number;
  /** Run the job through the page cache (`--direct=0`) even when the workload says O_DIRECT. */
  buffered?: boolean;
  /** The kernel does the I/O on the image file itself (FUSE passthrough): O_DIRECT reaches the file. */
  passthrough?: boolean;
}

export interface ServeOptions {
  writable: boolean;
  size: number;
  /** qcow2: the pair's qcow2; raw: its raw twin, exported as a raw image; another format: the pair's converted image. */
  format: ImageFormat;
}

export interface Server {
  id: ServerId;
  label: string;
  /** Serves `pair` (its qcow2 or raw twin, as `format` says; the raw twin for the host file); a BlkError says why it cannot. */
  serve(pair: ImagePair, opts: ServeOptions): Promise<Exported>;
}

export interface ServerContext {
  /** The run's temporary directory (mountpoints and pid files live there). */
  dir: string;
  cleanup: Cleanup;
  /** The repository, for bin/blkexport and dist/. */
  repo: string;
}

const MOUNT_TIMEOUT_MS = 30_000;

/** The last lines of a tool's complaint, on one line. */
function complaint(text: string): string {
  const lines = text
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean);
  const s = lines.slice(-2).join(' / ');
  return s.length > 240 ? `${s.slice(0, 237)}...` : s || 'no message';
}

/** The file a server opens for `format`: the pair's raw twin, its qcow2, or its converted image (format rows). */
function imageOf(pair: ImagePair, format: ImageFormat): string {
  if (format === 'raw') return pair.raw;
  if (format === 'qcow2') return pair.qcow2;
  if (pair.converted === undefined)
    throw new BlkError('INTERNAL', `no ${format} image was made for this row`);
  return pair.converted;
}

/** QEMU's option syntax doubles commas inside values. */
function qemuValue(s: string): string {
  return s.replaceAll(',', ',,');
}

async function mountedWithSize(path: string, size: number): Promise<boolean> {
  if (!(await isMounted(path))) return false;
  // A separate process from the server, so looking at the mount cannot deadlock it.
  return (await stat(path)).size === Math.ceil(size / 512) * 512;
}

async function emptyMountpoint(path: string): Promise<void> {
  if (await isMounted(path))
    throw new BlkError('MOUNT_FAILED', `${path} is still mounted from an earlier run`);
  await writeFile(path, '');
}

/** qemu-storage-daemon 7.2 with `--export type=fuse`, in the foreground as our child. */
function qsdServer(ctx: ServerContext): Server {
  const mnt = join(ctx.dir, 'mnt-qsd');
  return {
    id: 'qsd',
    label: 'qemu-storage-daemon',
    async serve(pair, { writable, size, format }) {
      const args = [
        '--blockdev',
        `node-name=prot,driver=file,filename=${qemuValue(imageOf(pair, format))}`,
        '--blockdev',
        `node-name=fmt,driver=${format},file=prot`,
        '--export',
        `type=fuse,id=exp0,node-name=fmt,mountpoint=${qemuValue(mnt)},writable=${writable ? 'on' : 'off'}`,
      ];
      let proc: ReturnType<typeof startServer> | undefined;
      const stop = ctx.cleanup.add('qemu-storage-daemon', async () => {
        if (proc && !(await waitExit(proc.child, 0))) {
          proc.child.kill('SIGTERM');
          if (!(await waitExit(proc.child, 30_000))) {
            proc.child.kill('SIGKILL');
            await waitExit(proc.child, 5_000);
          }
        }
        await unmountIfMounted(mnt);
      });
      await emptyMountpoint(mnt);
      if (ctx.cleanup.aborting) throw new BlkError('MOUNT_FAILED', 'interrupted');
      const started = startServer('qemu-storage-daemon', args);
      proc = started;
      try {
        await waitUntil(
          async () => {
            if (started.child.exitCode !== null || started.child.signalCode !== null) {
              throw new BlkError(
                'MOUNT_FAILED',
                `qemu-storage-daemon exited: ${complaint(started.stderr())}`,
              );
            }
            return mountedWithSize(mnt, size);
          },
          MOUNT_TIMEOUT_MS,
          `qemu-storage-daemon to mount ${mnt}`,
        );
      } catch (e) {
        await stop();
        throw e;
      }
      return { path: mnt, stop, ...(started.child.pid ? { pid: started.child.pid } : {}) };
    },
  };
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function readPid(pidfile: string): Promise<number | undefined> {
  try {
    const pid = Number((await readFile(pidfile, 'utf8')).trim());
    return Number.isSafeInteger(pid) && pid > 1 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** blkexport's one-shot export: `mount --daemonize --pidfile`, then `umount` (README, "The one-shot `mount`"). */
function blkexportServer(ctx: ServerContext): Server {
  const mnt = join(ctx.dir, 'mnt-blkexport');
  const pidfile = join(ctx.dir, 'blkexport.pid');
  const bin = join(ctx.repo, 'bin', 'blkexport');
  const built = join(ctx.repo, 'dist', 'cli', 'main.js');
  const cli = (args: string[], timeoutMs: number) =>
    runCommand(process.execPath, [bin, ...args], { timeoutMs, server: true });
  /** A `mount --daemonize` still running: shutting down waits for it, or its export would outlive the run. */
  let pending: Promise<unknown> | undefined;

  /** Unmounts through the CLI; falls back to killing the pid from the pid file and a lazy unmount. */
  async function shutdown(): Promise<void> {
    await pending?.catch(() => {});
    const pid = await readPid(pidfile);
    if (await isMounted(mnt)) {
      const r = await cli(['umount', mnt], 60_000);
      if (r.status !== 0)
        process.stderr.write(`bench: blkexport umount ${mnt}: ${complaint(r.stderr || r.stdout)}\n`);
    }
    if (pid !== undefined) {
      for (let i = 0; i < 100 && pidAlive(pid); i++) await sleep(100);
      if (pidAlive(pid)) {
        process.stderr.write(`bench: blkexport (pid ${pid}) still running after umount; killing it\n`);
        process.kill(pid, 'SIGKILL');
      }
    }
    await unmountIfMounted(mnt);
    await rm(pidfile, { force: true });
  }

  return {
    id: 'blkexport',
    label: 'blkexport',
    async serve(pair, { writable, size, format }) {
      if (!existsSync(built))
        throw new BlkError('NOT_SUPPORTED', 'not built (dist/cli/main.js missing: npm run build)');
      const stop = ctx.cleanup.add('blkexport mount', shutdown);
      await emptyMountpoint(mnt);
      await rm(pidfile, { force: true });
      const image = imageOf(pair, format);
      const args = ['mount', image, mnt, '--format', format, '--daemonize', '--pidfile', pidfile];
      if (writable) args.push('--writable');
      try {
        if (ctx.cleanup.aborting) throw new BlkError('MOUNT_FAILED', 'interrupted');
        pending = cli(args, 120_000);
        const r = await (pending as ReturnType<typeof cli>);
        pending = undefined;
        if (r.status !== 0) {
          throw new BlkError(
            'MOUNT_FAILED',
            `blkexport mount exited ${r.status ?? r.signal}: ${complaint(r.stderr || r.stdout)}`,
          );
        }
        await waitUntil(() => mountedWithSize(mnt, size), 10_000, `blkexport's mount on ${mnt}`);
        const pid = await readPid(pidfile);
        // The ready line says "(FUSE passthrough)" when the kernel serves the export's I/O itself.
        const passthrough = /\(FUSE passthrough\)/.test(r.stdout + r.stderr);
        return { path: mnt, stop, passthrough, ...(pid ? { pid } : {}) };
      } catch (e) {
        try {
          await stop();
        } catch (e2) {
          process.stderr.write(`bench: cleaning up a failed blkexport mount: ${describeError(e2)}\n`);
        }
        throw e;
      }
    },
  };
}

/** The raw twin read and written directly on the host file system: the physical limit of this machine. */
function plainServer(): Server {
  return {
    id: 'plain',
    label: 'plain raw file',
    async serve(pair) {
      return { path: pair.raw, stop: async () => {} };
    },
  };
}

/**
 * The raw twin through the host page cache, for O_DIRECT rows: read once
 * (so every page is cached), then the same job with `--direct=0`. Both
 * exports open their image file without O_DIRECT, so this, not the plain
 * column's trip to the disk, is the like-for-like limit of those rows.
 */
function plainCachedServer(): Server {
  return {
    id: 'plain-cached',
    label: 'plain raw file, host page cache',
    async serve(pair) {
      const fh = await open(pair.raw, 'r');
      try {
        const buf = Buffer.allocUnsafe(4 * 2 ** 20);
        for (let pos = 0; ; pos += buf.length)
          if ((await fh.read(buf, 0, buf.length, pos)).bytesRead === 0) break;
      } finally {
        await fh.close();
      }
      return { path: pair.raw, stop: async () => {}, buffered: true };
    },
  };
}

/** The servers of a run, in SERVER_IDS order. */
export function makeServers(ctx: ServerContext): Server[] {
  return [qsdServer(ctx), blkexportServer(ctx), plainServer(), plainCachedServer()];
}
