/**
 * A real `blkexport agent` process for the agent benchmarks (agent.ts,
 * scale.ts): started on a manifest directory, its stderr tail kept for error
 * messages, and one cleanup step that stops it (SIGTERM, then SIGKILL), stops
 * the fd holder it may have left, and unmounts whatever is still mounted under
 * the benchmark's directory (in parallel: an agent killed at 5000 exports
 * leaves thousands, and one `umount` child each took the run 20 minutes to end).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { nativeHelper } from '../src/block/lock-native.js';
import { lazyUnmount } from '../src/export/fuse/file-fs.js';
import { inParallel } from '../src/parallel.js';
import type { Cleanup } from './cleanup.js';
import { mountPoints } from './proc.js';

const REPO = new URL('..', import.meta.url).pathname.replace(/\/$/, '');
const BIN = join(REPO, 'bin', 'blkexport');

export interface BenchAgent {
  proc: ChildProcess;
  socket: string;
  /** The last 4000 characters the agent wrote to stderr. */
  stderr(): string;
  exited: Promise<void>;
  /** Runs the cleanup step now (a measurement that is over, or failed, frees the machine for the next one). */
  stop(): Promise<void>;
}

export interface BenchAgentOptions {
  /** The run's directory: socket, fd holder socket; every mount under it is undone at cleanup. */
  root: string;
  manifests: string;
  allowRoot: string;
  cleanup: Cleanup;
  label: string;
  /** More agent arguments (e.g. --max-exports). */
  args?: string[];
  /** How long SIGTERM may take before SIGKILL. */
  stopTimeoutMs: number;
}

/** Mountpoints under `dir` in the kernel's table. */
export async function mountsUnder(dir: string): Promise<string[]> {
  return (await mountPoints()).filter((m) => m.startsWith(`${dir}/`));
}

/** Starts the agent (resync an hour away: passes come from edits); registers its cleanup first. */
export function startBenchAgent(o: BenchAgentOptions): BenchAgent {
  const socket = join(o.root, 'agent.sock');
  const fdstore = join(o.root, 'fdstore.sock');
  // BENCH_CPU_PROF=DIR: the agent writes a V8 CPU profile there on exit (docs/benchmarks.md).
  const prof = process.env.BENCH_CPU_PROF;
  const proc = spawn(
    process.execPath,
    [
      ...(prof ? ['--cpu-prof', '--cpu-prof-dir', prof] : []),
      BIN,
      'agent',
      '--manifests',
      o.manifests,
      '--socket',
      socket,
      '--allow-root',
      o.allowRoot,
      '--resync',
      '3600',
      '--fdstore',
      fdstore,
      ...(o.args ?? []),
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  proc.stderr!.on('data', (d) => {
    stderr = (stderr + d).slice(-4000);
  });
  const exited = new Promise<void>((res) => proc.on('exit', () => res()));
  const stop = o.cleanup.add(o.label, async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      await Promise.race([exited, sleep(o.stopTimeoutMs)]);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    }
    // An agent that had to be killed leaves its fd holder: stop it (it unmounts what it holds).
    try {
      nativeHelper().holderRequest(fdstore, 'QUIT', '', '', Buffer.alloc(0), []);
    } catch {
      // none runs
    }
    // Thousands may be left (an agent killed at scale): one look at the mount table, then lazy
    // unmounts (umount2 as root, no child process each), 16 at a time.
    await inParallel(await mountsUnder(o.root), 16, (m) => lazyUnmount(m).catch(() => undefined));
  });
  return { proc, socket, stderr: () => stderr, exited, stop };
}
