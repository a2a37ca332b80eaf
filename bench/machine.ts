/** The machine a benchmark ran on, for the report's header: figures are only comparable within one run. */
import { readFile } from 'node:fs/promises';
import { availableParallelism, cpus, release, totalmem } from 'node:os';
import { runCommand } from './proc.js';

export interface MachineInfo {
  cpu: string;
  nproc: number;
  memoryGiB: number;
  kernel: string;
  os: string;
  qemu: string;
  fio: string;
  node: string;
  blkexport: string;
}

async function firstLine(cmd: string, args: string[]): Promise<string> {
  try {
    const r = await runCommand(cmd, args, { timeoutMs: 10_000 });
    return r.status === 0 ? (r.stdout.split('\n')[0] ?? '').trim() : `unknown (${cmd} exited ${r.status})`;
  } catch {
    return `unknown (${cmd} missing)`;
  }
}

async function osName(): Promise<string> {
  try {
    const text = await readFile('/etc/os-release', 'utf8');
    return /^PRETTY_NAME="?([^"\n]*)"?/m.exec(text)?.[1] ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

/** Describes this machine and the versions under test; `repo` is the blkexport checkout. */
export async function describeMachine(repo: string): Promise<MachineInfo> {
  const commit = await firstLine('git', ['-C', repo, 'rev-parse', '--short', 'HEAD']);
  const dirty = await runCommand('git', ['-C', repo, 'status', '--porcelain', '--untracked-files=no'], {
    timeoutMs: 10_000,
  }).catch(() => undefined);
  return {
    cpu: cpus()[0]?.model.trim() ?? 'unknown',
    nproc: availableParallelism(),
    memoryGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    kernel: release(),
    os: await osName(),
    qemu: await firstLine('qemu-storage-daemon', ['--version']),
    fio: await firstLine('fio', ['--version']),
    node: process.version,
    blkexport: dirty?.stdout.trim() ? `${commit} (with uncommitted changes)` : commit,
  };
}
