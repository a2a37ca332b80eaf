/**
 * Helpers for locking tests: the lock bytes /proc/locks shows on a file, and a
 * qemu-io process that holds an image open (its clean-up registered first).
 */
import { spawn } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { until } from '../helpers/agent.js';

/** Every OFD lock byte on `path` (one entry per holder and byte, sorted), from /proc/locks. */
export function lockBytesOn(path: string): number[] {
  const ino = statSync(path).ino;
  const out: number[] = [];
  for (const line of readFileSync('/proc/locks', 'utf8').split('\n')) {
    const f = line.trim().split(/\s+/);
    // "1: OFDLCK ADVISORY READ -1 fd:01:2146992 100 101" (a blocked waiter has "->" first)
    if (f[1] !== 'OFDLCK' || !f[5]?.endsWith(`:${ino}`)) continue;
    const start = Number(f[6]);
    const end = f[7] === 'EOF' ? start : Number(f[7]);
    for (let b = start; b <= end; b++) out.push(b);
  }
  return out.sort((a, b) => a - b);
}

/** Starts `qemu-io [args] IMG` and waits until its locks show; killed when the test ends. */
export async function holdWithQemuIo(
  t: { after(fn: () => void | Promise<void>): void },
  img: string,
  args: string[],
): Promise<{ stop(): Promise<void> }> {
  const before = lockBytesOn(img).length;
  const proc = spawn('qemu-io', [...args, img], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout.on('data', (d) => {
    out += d;
  });
  proc.stderr.on('data', (d) => {
    out += d;
  });
  const exited = new Promise<void>((resolve) => proc.on('exit', () => resolve()));
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGKILL');
      await exited;
    }
  };
  t.after(stop);
  await until(
    `qemu-io ${args.join(' ')} to lock ${img}`,
    () => {
      if (proc.exitCode !== null) throw new Error(`qemu-io exited ${proc.exitCode}: ${out}`);
      return lockBytesOn(img).length > before;
    },
    10_000,
  );
  await sleep(50);
  return { stop };
}
