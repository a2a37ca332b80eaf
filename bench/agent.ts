import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BlkError } from '../src/errors.js';
import { startBenchAgent } from './agent-process.js';
import type { Cleanup } from './cleanup.js';
import { cpuSeconds, isMounted, rssMiB, runCommand, waitUntil } from './proc.js';

const REPO = new URL('..', import.meta.url).pathname.replace(/\/$/, '');
const BIN = join(REPO, 'bin', 'blkexport');

export interface AgentFigures {
  exports: number;
  /** Seconds from agent start until every export reports `ready`. */
  exportsReadySeconds: number;
  /** Resident set size of the agent with all exports up, MiB. */
  rssMiB: number;
  edits: number;
  reconcileP50Ms: number;
  reconcileP99Ms: number;
  /** CPU seconds (user + system) of the serving process per GiB read through an export. */
  cpuSecondsPerGiB: number;
  /** GiB read for the CPU figure. */
  readGiB: number;
}

export type AgentOutcome = { measured: true; figures: AgentFigures } | { measured: false; reason: string };

export interface AgentBenchOptions {
  dir: string;
  cleanup: Cleanup;
  exports?: number;
  edits?: number;
  /** Bytes of the image read for the CPU figure. */
  readBytes?: number;
  log?: (msg: string) => void;
}

function manifest(name: string, exports: { id: string; image: string; mountpoint: string }[]): string {
  const lines = [
    'apiVersion: blkexport/v1',
    'kind: ExportSet',
    'metadata:',
    `  name: ${name}`,
    'spec:',
    '  exports:',
  ];
  for (const e of exports) {
    lines.push(
      `    - id: ${e.id}`,
      `      image: ${e.image}`,
      '      format: qcow2',
      `      mountpoint: ${e.mountpoint}`,
      '      create-mountpoint: true',
    );
  }
  return `${lines.join('\n')}\n`;
}

/** The p-th percentile of an ascending list (nearest rank). */
export function percentile(sorted: number[], p: number): number {
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i]!;
}

async function procStat(pid: number): Promise<{ cpuS: number; rssMiB: number }> {
  return { cpuS: await cpuSeconds(pid), rssMiB: await rssMiB(pid) };
}

async function readableFromChild(path: string): Promise<boolean> {
  const r = await runCommand('head', ['-c', '512', path], { timeoutMs: 10_000 });
  return r.status === 0;
}

/** How many exports the agent on `socket` reports ready; -1 when it does not answer. */
export async function readyCount(socket: string, timeoutMs = 20_000): Promise<number> {
  const r = await runCommand(BIN, ['status', '--socket', socket, '-o', 'json'], { timeoutMs });
  if (r.status !== 0) return -1;
  const s = JSON.parse(r.stdout) as { exports: { state: string }[] };
  return s.exports.filter((e) => e.state === 'ready').length;
}

/** Runs the agent figures in `opts.dir`; everything it starts is undone through opts.cleanup. */
export async function measureAgent(opts: AgentBenchOptions): Promise<AgentOutcome> {
  const n = opts.exports ?? 200;
  const edits = opts.edits ?? 100;
  const readBytes = opts.readBytes ?? 512 * 2 ** 20;
  const log = opts.log ?? (() => undefined);
  const root = join(opts.dir, 'agent');
  const images = join(root, 'images');
  const manifests = join(root, 'manifests');
  await mkdir(images, { recursive: true });
  await mkdir(manifests, { recursive: true });
  opts.cleanup.add('agent bench files', () => rm(root, { recursive: true, force: true }));

  // One fully written qcow2 (real data for the CPU figure) shared by every export.
  const img = join(images, 'shared.qcow2');
  let r = await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(readBytes)], {
    timeoutMs: 60_000,
  });
  if (r.status !== 0) throw new BlkError('IO', `qemu-img create: ${r.stderr}`);
  r = await runCommand('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a 0 ${readBytes}`, img], {
    timeoutMs: 300_000,
  });
  if (r.status !== 0) throw new BlkError('IO', `qemu-io write: ${r.stderr}`);

  // N exports in N/10 manifest files.
  const perFile = 10;
  for (let f = 0; f < Math.ceil(n / perFile); f++) {
    const ex = [];
    for (let i = f * perFile; i < Math.min(n, (f + 1) * perFile); i++) {
      ex.push({ id: `e${i}`, image: img, mountpoint: join(images, `e${i}.raw`) });
    }
    await writeFile(join(manifests, `set${String(f).padStart(3, '0')}.yaml`), manifest(`set${f}`, ex));
  }

  const t0 = performance.now();
  const {
    proc: agent,
    socket,
    stderr,
    stop,
  } = startBenchAgent({
    root,
    manifests,
    allowRoot: images,
    cleanup: opts.cleanup,
    label: 'agent',
    stopTimeoutMs: 60_000,
  });
  try {
    await waitUntil(
      async () => {
        if (agent.exitCode !== null) throw new BlkError('AGENT', `agent exited: ${stderr()}`);
        return (await readyCount(socket)) === n;
      },
      120_000,
      `${n} exports ready`,
    );
    const exportsReadySeconds = (performance.now() - t0) / 1000;
    const { rssMiB } = await procStat(agent.pid!);
    log(`${n} exports ready in ${exportsReadySeconds.toFixed(2)} s, RSS ${rssMiB.toFixed(0)} MiB`);

    // Reconcile latency: add one export (save a manifest), wait until it reads from here; then remove it.
    const editFile = join(manifests, 'edit.yaml');
    const editMnt = join(images, 'edit.raw');
    const lat: number[] = [];
    for (let i = 0; i < edits; i++) {
      const start = performance.now();
      await writeFile(editFile, manifest('edit', [{ id: `edit${i}`, image: img, mountpoint: editMnt }]));
      // Poll every 5 ms (waitUntil's 50 ms would be a large part of the figure).
      while (!((await isMounted(editMnt)) && (await readableFromChild(editMnt)))) {
        if (performance.now() - start > 10_000)
          throw new BlkError(
            'AGENT',
            `edit ${i} not readable within 10 s; the agent said: ${stderr().slice(-1500)}`,
          );
        await sleep(5);
      }
      lat.push(performance.now() - start);
      await rm(editFile);
      await waitUntil(async () => !(await isMounted(editMnt)), 10_000, `edit ${i} removed`);
    }
    lat.sort((a, b) => a - b);
    log(
      `reconcile latency over ${edits} edits: p50 ${percentile(lat, 50).toFixed(0)} ms, p99 ${percentile(lat, 99).toFixed(0)} ms`,
    );

    // CPU per GiB: read the whole image through one export, a few times.
    const before = await procStat(agent.pid!);
    const passes = Math.max(1, Math.round(2 ** 30 / readBytes));
    for (let i = 0; i < passes; i++) {
      r = await runCommand('dd', [`if=${join(images, 'e0.raw')}`, 'of=/dev/null', 'bs=1M', 'status=none'], {
        timeoutMs: 300_000,
      });
      if (r.status !== 0) throw new BlkError('IO', `dd: ${r.stderr}`);
    }
    const after = await procStat(agent.pid!);
    const readGiB = (passes * readBytes) / 2 ** 30;
    const cpuSecondsPerGiB = (after.cpuS - before.cpuS) / readGiB;
    log(`CPU ${cpuSecondsPerGiB.toFixed(2)} s per GiB read`);

    return {
      measured: true,
      figures: {
        exports: n,
        exportsReadySeconds,
        rssMiB,
        edits,
        reconcileP50Ms: percentile(lat, 50),
        reconcileP99Ms: percentile(lat, 99),
        cpuSecondsPerGiB,
        readGiB,
      },
    };
  } finally {
    await stop();
  }
}

/** The report's "Agent" section. */
export function renderAgentSection(outcome: AgentOutcome): string {
  const lines = ['## Agent', ''];
  if (!outcome.measured) {
    lines.push(`n/a — ${outcome.reason}.`, '');
    return lines.join('\n');
  }
  const f = outcome.figures;
  const ok = (good: boolean) => (good ? 'met' : '**missed**');
  lines.push(
    '| figure | value | target | |',
    '|---|---|---|---|',
    `| ${f.exports} exports ready (from agent start) | ${f.exportsReadySeconds.toFixed(2)} s | ≤ 10 s | ${ok(f.exportsReadySeconds <= 10)} |`,
    `| agent RSS with ${f.exports} exports | ${f.rssMiB.toFixed(0)} MiB | ≤ 300 MiB | ${ok(f.rssMiB <= 300)} |`,
    `| reconcile latency p50 / p99 (${f.edits} edits: saved → readable) | ${f.reconcileP50Ms.toFixed(0)} / ${f.reconcileP99Ms.toFixed(0)} ms | p50 ≤ 100 ms | ${ok(f.reconcileP50Ms <= 100)} |`,
    `| agent CPU per GiB read (${f.readGiB.toFixed(1)} GiB, dd bs=1M) | ${f.cpuSecondsPerGiB.toFixed(2)} s | | |`,
    '',
  );
  return lines.join('\n');
}
