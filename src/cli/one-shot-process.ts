/**
 * The process around a one-shot export (`mount`, `nbd`): serve in the
 * foreground until a signal, or --daemonize: a detached copy of the command
 * that reports through IPC once the export is ready (or why it failed).
 */
import { spawn } from 'node:child_process';
import { unlink, writeFile } from 'node:fs/promises';
import { BlkError, describeError } from '../errors.js';

const DAEMON_ENV = 'BLKEXPORT_DAEMON_CHILD';

/** A started one-shot export: what to say once it is ready, and how to stop it. */
export interface OneShotSession {
  ready: string;
  stop(): Promise<void>;
}

/** Serves until SIGINT/SIGTERM/SIGHUP; resolves with the exit status. */
async function serve(
  command: string,
  start: () => Promise<OneShotSession>,
  pidfile: string | undefined,
  ready: (msg: string) => void,
): Promise<number> {
  const session = await start();
  if (pidfile) {
    try {
      await writeFile(pidfile, `${process.pid}\n`);
    } catch (e) {
      await session.stop();
      throw new BlkError('USAGE', `cannot write pidfile '${pidfile}': ${(e as Error).message}`);
    }
  }
  ready(session.ready);
  return new Promise((resolveExit) => {
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      session
        .stop()
        .then(
          () => 0,
          (e) => {
            console.error(`blkexport ${command}: stopping on ${sig}: ${describeError(e)}`);
            return 1;
          },
        )
        .then(async (code) => {
          if (pidfile) await unlink(pidfile).catch(() => undefined);
          resolveExit(code);
        });
    };
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => stop(sig));
  });
}

/** Starts a detached copy of this command and waits for its ready/failed message. */
function daemonize(command: string, args: string[]): Promise<number> {
  const childArgs = [
    ...process.execArgv,
    process.argv[1]!,
    command,
    ...args.filter((a) => a !== '--daemonize'),
  ];
  const child = spawn(process.execPath, childArgs, {
    detached: true,
    stdio: ['ignore', 'ignore', 'ignore', 'ipc'],
    env: { ...process.env, [DAEMON_ENV]: '1' },
  });
  return new Promise((resolveExit) => {
    let answered = false;
    child.on('message', (m: { ok: boolean; message: string }) => {
      answered = true;
      if (m.ok) {
        console.log(`${m.message} (pid ${child.pid})`);
        child.disconnect();
        child.unref();
        resolveExit(0);
      } else {
        console.error(`blkexport ${command}: ${m.message}`);
        resolveExit(1);
      }
    });
    child.on('exit', (code, signal) => {
      if (!answered) {
        console.error(
          `blkexport ${command}: the serving process exited (${signal ?? `status ${code}`}) before the export was ready`,
        );
        resolveExit(1);
      }
    });
    child.on('error', (e) => {
      if (!answered) {
        answered = true;
        console.error(`blkexport ${command}: cannot start the serving process: ${e.message}`);
        resolveExit(1);
      }
    });
  });
}

/**
 * Runs a one-shot export command: in the foreground, as the detached child
 * of --daemonize (readiness through IPC), or as the parent that starts it.
 */
export async function runOneShot(
  command: string,
  args: string[],
  o: { daemonize: boolean; pidfile: string | undefined; start: () => Promise<OneShotSession> },
): Promise<number> {
  if (o.daemonize) return daemonize(command, args);
  if (process.env[DAEMON_ENV] === '1' && process.send) {
    const send = process.send.bind(process);
    try {
      return await serve(command, o.start, o.pidfile, (message) => {
        send({ ok: true, message });
        process.disconnect?.();
      });
    } catch (e) {
      send({ ok: false, message: describeError(e) });
      return 1;
    }
  }
  return serve(command, o.start, o.pidfile, (msg) => console.log(`${msg}; Ctrl-C to stop`));
}
