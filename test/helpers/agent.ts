/**
 * Starts a real agent process for integration tests, with its clean-up
 * registered before it starts: SIGTERM, then SIGKILL and lazy unmounts of
 * anything left under the test directory.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { appendFileSync, mkdirSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { nativeHelper } from '../../src/block/lock-native.js';
import { cleanupMountsUnder } from './mounts.js';
import { BIN, tempDir } from './tools.js';

export interface AgentHandle {
  dir: string;
  manifests: string;
  images: string;
  socket: string;
  proc: ChildProcess;
  log(): string;
  /** GET a path of the control socket; parsed JSON unless raw. */
  get<T = unknown>(path: string): Promise<T>;
  post<T = unknown>(path: string): Promise<T>;
  /** Resolves with the exit code. */
  exited: Promise<number | null>;
}

function call(socketPath: string, method: string, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method, path, timeout: 20_000 }, (res) => {
      let body = '';
      res.on('data', (d) => {
        body += d;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Polls `fn` until it returns a truthy value (returned) or `timeoutMs` passes (throws with `what`). */
export async function until<T>(
  what: string,
  fn: () => T | Promise<T>,
  timeoutMs = 5000,
): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v as NonNullable<T>;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last}` : ''}`);
    await sleep(50);
  }
}

/**
 * Waits until the agent's log matches `re`, then asserts it (so a failure
 * shows the log). The log arrives over a pipe, which the test process may
 * read after it has read an answer the agent sent later on its socket.
 */
export async function logMatches(agent: { log(): string }, re: RegExp, timeoutMs = 5000): Promise<void> {
  try {
    await until(`the log to match ${re}`, () => re.test(agent.log()), timeoutMs);
  } catch {
    // fall through to the assertion, which prints the log
  }
  assert.match(agent.log(), re);
}

/**
 * Stops the fd holder on `socket`, if one answers: SIGTERM, which unmounts
 * whatever it still holds (an agent the test killed), then waits for it.
 */
export async function stopHolder(socket: string): Promise<void> {
  let pid: number | undefined;
  try {
    const r = nativeHelper().holderRequest(socket, 'PING', '', '', Buffer.alloc(0), []);
    pid = Number(r.text.split(' ')[1]);
  } catch {
    return; // none runs
  }
  if (!pid) return;
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  for (let i = 0; i < 100; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      return;
    }
    await sleep(50);
  }
  process.kill(pid, 'SIGKILL');
}

/** A test directory with manifests/ and images/ whose mounts are cleaned up at the end. */
export function agentDir(t: Parameters<typeof tempDir>[0]): {
  dir: string;
  manifests: string;
  images: string;
} {
  const dir = tempDir(t, 'blkexport-agent-', cleanupMountsUnder);
  const manifests = join(dir, 'manifests');
  const images = join(dir, 'images');
  mkdirSync(manifests);
  mkdirSync(images);
  return { dir, manifests, images };
}

/** Starts `blkexport agent` on dirs from agentDir and waits until its socket answers. */
export async function startAgent(
  t: { after(fn: () => void | Promise<void>): void },
  dirs: { dir: string; manifests: string; images: string },
  extraArgs: string[] = [],
  env: NodeJS.ProcessEnv = {},
): Promise<AgentHandle> {
  const socket = join(dirs.dir, 'agent.sock');
  const fdstore = join(dirs.dir, 'fdstore.sock');
  // Registered before anything starts: the fd holder an agent starts outlives it by design.
  t.after(() => stopHolder(fdstore));
  const args = [
    'agent',
    '--manifests',
    dirs.manifests,
    '--socket',
    socket,
    '--allow-root',
    dirs.images,
    '--resync',
    '2',
    '--fdstore',
    fdstore,
    ...extraArgs,
  ];
  const proc = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let log = '';
  proc.stdout!.on('data', (d) => {
    log += d;
  });
  proc.stderr!.on('data', (d) => {
    log += d;
  });
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  // Debugging aid: BLKEXPORT_TEST_AGENT_LOGS=file appends every agent's log there when it exits.
  const logFile = process.env.BLKEXPORT_TEST_AGENT_LOGS;
  if (logFile)
    void exited.then((code) => appendFileSync(logFile, `--- agent ${proc.pid} exit ${code}\n${log}`));
  t.after(async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      await Promise.race([exited, sleep(10_000)]);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    }
  });
  const handle: AgentHandle = {
    ...dirs,
    socket,
    proc,
    log: () => log,
    exited,
    async get<T>(path: string) {
      const r = await call(socket, 'GET', path);
      if (r.status !== 200) throw new Error(`GET ${path}: ${r.status} ${r.body}`);
      return (path === '/metrics' ? r.body : JSON.parse(r.body)) as T;
    },
    async post<T>(path: string) {
      const r = await call(socket, 'POST', path);
      if (r.status !== 200) throw new Error(`POST ${path}: ${r.status} ${r.body}`);
      return JSON.parse(r.body) as T;
    },
  };
  await until(
    'the agent to answer on its socket',
    async () => {
      if (proc.exitCode !== null) throw new Error(`agent exited ${proc.exitCode}: ${log}`);
      const s = await handle.get<{ agent: { passes: number } }>('/status');
      return s.agent.passes > 0;
    },
    15_000,
  );
  return handle;
}
