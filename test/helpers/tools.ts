/**
 * Test helpers for tests that use real tools (qemu-img, qemu-io, /dev/fuse).
 * Under CI=true a missing tool fails the test instead of skipping it: CI has them all.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';

export const REPO = new URL('../..', import.meta.url).pathname.replace(/\/$/, '');
export const BIN = join(REPO, 'bin', 'blkexport');

function which(tool: string): boolean {
  if (tool.startsWith('/')) return existsSync(tool);
  return spawnSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' }).status === 0;
}

/** Returns the tools that are missing; under CI=true throws instead. */
export function missingTools(...tools: string[]): string[] {
  const missing = tools.filter((t) => !which(t));
  if (missing.length && process.env.CI === 'true') {
    throw new Error(`required tools missing under CI: ${missing.join(', ')}`);
  }
  return missing;
}

/** Skips the test (or fails it under CI=true) unless every tool is present; returns false when skipped. */
export function needTools(t: TestContext, ...tools: string[]): boolean {
  const missing = missingTools(...tools);
  if (missing.length) {
    t.skip(`missing: ${missing.join(', ')}`);
    return false;
  }
  return true;
}

/** A fresh temporary directory removed when the test ends (also on failure). */
export function tempDir(
  t: { after(fn: () => void): void },
  prefix = 'blkexport-test-',
  beforeRemove?: (dir: string) => void,
): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => {
    try {
      beforeRemove?.(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  return dir;
}

export interface RunResult {
  status: number;
  stdout: string;
  stderr: string;
}

/** Runs a command synchronously and returns its status and output (never throws on non-zero). */
export function run(
  cmd: string,
  args: string[],
  opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number } = {},
): RunResult {
  const r = spawnSync(cmd, args, {
    input: opts.input,
    env: opts.env ?? process.env,
    cwd: opts.cwd,
    timeout: opts.timeoutMs ?? 120_000,
    maxBuffer: 256 * 1024 * 1024,
  });
  if (r.error) throw r.error;
  return { status: r.status ?? -1, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

/** Runs a command and throws with its stderr unless it exits 0; returns stdout. */
export function runOk(cmd: string, args: string[], opts: Parameters<typeof run>[2] = {}): string {
  const r = run(cmd, args, opts);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}: ${r.stderr || r.stdout}`);
  return r.stdout;
}

/** qemu-img with arguments; throws on failure. */
export function qemuImg(...args: string[]): string {
  return runOk('qemu-img', args);
}

/** qemu-io with arguments (each -c command given separately); throws on failure. */
export function qemuIo(...args: string[]): string {
  const out = runOk('qemu-io', args);
  if (/error|failed/i.test(out)) throw new Error(`qemu-io ${args.join(' ')}: ${out}`);
  return out;
}

/** A small seeded PRNG (xorshift128+ style, 32-bit) so generated data is reproducible. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0 || 1;
  let b = (seed * 2654435761) >>> 0 || 2;
  let c = 0x9e3779b9;
  let d = 0x85ebca6b;
  return () => {
    const t = a ^ (a << 11);
    a = b;
    b = c;
    c = d;
    d = (d ^ (d >>> 19) ^ t ^ (t >>> 8)) >>> 0;
    return d / 4294967296;
  };
}

/** Fills a buffer of `len` bytes with seeded pseudo-random data. */
export function randomBytes(rand: () => number, len: number): Buffer {
  const buf = Buffer.allocUnsafe(len);
  for (let i = 0; i < len; i += 4) {
    const v = (rand() * 4294967296) >>> 0;
    for (let j = 0; j < 4 && i + j < len; j++) buf[i + j] = (v >>> (8 * j)) & 0xff;
  }
  return buf;
}
