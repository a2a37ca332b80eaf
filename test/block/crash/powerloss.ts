/**
 * The power-loss check: record a workload, generate crash states, and check
 * every state:
 *   - blkexport's own check (check.ts, in process) finds no corruption
 *     (leaks allowed) — every state; a dirty lazy-refcount image is exempt
 *     (its refcounts are rebuilt on the next writable open, checked below);
 *   - every guest byte a completed flush covered reads back exactly through
 *     blkexport's block layer — every state;
 *   - `qemu-img check` reports no corruption and `qemu-img convert` reads the
 *     same flushed bytes — every `qemuEvery`-th state;
 *   - blkexport opens the state writable and keeps writing (writes, a
 *     flush, read-back), then `qemu-img check` is clean but for leaks —
 *     every `continueEvery`-th state, and every dirty state.
 */

import { spawn } from 'node:child_process';
import {
  closeSync,
  ftruncateSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { checkImage } from '../../../src/block/format/qcow2/check.js';
import { INCOMPAT_DIRTY } from '../../../src/block/format/qcow2/header.js';
import { stateOf } from '../../../src/block/format/qcow2/inspect.js';
import { openImage } from '../../../src/block/open-image.js';
import { randomBytes, seededRandom } from '../../helpers/tools.js';
import {
  analyzeLog,
  buildImage,
  type CrashState,
  compareGuest,
  describeState,
  earliestPoint,
  type GuestExpectation,
  GuestModel,
  ImageBuilder,
  type LogAnalysis,
  latestPoint,
  overlappingConcurrentWrites,
  sampleStates,
} from './crash-states.js';
import { type Feature, type Recording, recordWorkload, type Workload } from './workloads.js';

export interface PowerLossOptions {
  seed: number;
  /** qemu-img check + convert on every n-th state. */
  qemuEvery: number;
  /** Writable continuation on every n-th state (and every dirty one). */
  continueEvery: number;
  /** Cap of states per workload. */
  maxStates?: number;
  /** Random subsets per epoch (default: the workload's). */
  random?: number;
}

export interface PowerLossResult {
  workload: string;
  seed: number;
  epochs: number;
  hostWrites: number;
  syncs: number;
  states: number;
  qemuChecked: number;
  continued: number;
  dirty: number;
  torn: number;
  failures: string[];
  /** What the workload was meant to exercise and did (see Workload.exercises). */
  exercised: Feature[];
}

/** States whose qemu-img checks wait for the next batch (one shell, one fork, per batch). */
const BATCH = 24;

const CHUNK = 64 * 1024;
const ZERO = Buffer.alloc(CHUNK);

/**
 * Replaces `file`'s content with `bytes`, leaving all-zero chunks as holes
 * (the image file grows in 8 MiB steps, mostly zeroes; holes read the same).
 */
function putFile(file: string, bytes: Buffer): void {
  const fd = openSync(file, 'w');
  try {
    ftruncateSync(fd, bytes.length);
    for (let at = 0; at < bytes.length; at += CHUNK) {
      const end = Math.min(bytes.length, at + CHUNK);
      if (bytes.compare(ZERO, 0, end - at, at, end) !== 0) writeSync(fd, bytes, at, end - at, at);
    }
  } finally {
    closeSync(fd);
  }
}

async function readGuest(
  image: string,
  dir: string,
): Promise<{ bytes: Buffer; dirty: boolean; problem?: string }> {
  const img = await openImage({ filename: image, format: 'qcow2', readOnly: true, allowedRoots: [dir] });
  try {
    const s = stateOf(img.node);
    const dirty = (s.header.incompatible & INCOMPAT_DIRTY) !== 0n;
    const bytes = Buffer.alloc(img.node.length());
    await img.node.read(0, bytes);
    if (!dirty) {
      const c = await checkImage(s, 'none');
      if (c.corruptions > 0 || c.checkErrors > 0) {
        const m = c.messages
          .filter((x) => !x.startsWith('Leaked'))
          .slice(0, 4)
          .join(' | ');
        return { bytes, dirty, problem: `blkexport check: ${c.corruptions} corruptions: ${m}` };
      }
    }
    return { bytes, dirty };
  } finally {
    await img.close();
  }
}

/** Opens the state writable, writes a few things, flushes, reads them back, closes. */
async function continueWriting(image: string, dir: string, seed: number): Promise<string | undefined> {
  const rand = seededRandom(seed);
  const img = await openImage({ filename: image, format: 'qcow2', readOnly: false, allowedRoots: [dir] });
  const written: [number, Buffer][] = [];
  try {
    // One write in each quarter of the disk: they never overlap, so each must read back as written.
    const quarter = Math.floor(img.node.length() / 4);
    for (let i = 0; i < 4; i++) {
      const len = 1 + Math.floor(rand() * Math.min(9000, quarter - 1));
      const off = i * quarter + Math.floor(rand() * (quarter - len));
      const data = randomBytes(rand, len);
      await img.node.write(off, data);
      written.push([off, data]);
    }
    await img.node.flush();
    for (const [off, data] of written) {
      const back = Buffer.alloc(data.length);
      await img.node.read(off, back);
      if (!back.equals(data)) return `continued writing: the write at ${off} does not read back`;
    }
  } finally {
    await img.close();
  }
  return undefined;
}

/** A qemu-img job of the batch: check (unless dirty) and, with expectations, convert and compare. */
interface QemuJob {
  file: string;
  check: boolean;
  exps: GuestExpectation[];
  /** Prefix of its messages, and where the failure goes. */
  what: string;
  report: (problem: string) => void;
}

let batches = 0;

/**
 * Runs the batch's qemu-img commands in one shell, in the background (the
 * other CPU checks the next states meanwhile; forking this process per
 * command would be slow: every fork write-protects its multi-MiB heap), then
 * reads the results. `qemu-img check` exits 0 when clean and 3 with leaks only.
 */
async function runBatch(dir: string, jobs: QemuJob[]): Promise<void> {
  if (jobs.length === 0) return;
  const id = batches++;
  const out = (i: number) => join(dir, `job-${id}-${i}`);
  const lines = jobs.map((j, i) => {
    const parts: string[] = [];
    if (j.check)
      parts.push(
        `qemu-img check -f qcow2 '${j.file}' >'${out(i)}.check' 2>&1; echo $? >'${out(i)}.check-rc'`,
      );
    if (j.exps.length > 0) {
      parts.push(
        `qemu-img convert -f qcow2 -O raw '${j.file}' '${out(i)}.raw' 2>'${out(i)}.convert'; echo $? >'${out(i)}.convert-rc'`,
      );
    }
    return parts.join('; ');
  });
  try {
    const status = await new Promise<number | null>((resolve, reject) => {
      const child = spawn('sh', ['-c', lines.join('\n')], { cwd: dir, stdio: 'ignore' });
      child.on('error', reject);
      child.on('close', resolve);
    });
    if (status !== 0) throw new Error(`qemu-img batch exited ${status}`);
    jobs.forEach((j, i) => {
      if (j.check) {
        const rc = Number(readFileSync(`${out(i)}.check-rc`, 'utf8'));
        if (rc !== 0 && rc !== 3) {
          const lines = readFileSync(`${out(i)}.check`, 'utf8')
            .trim()
            .split('\n');
          const text = lines
            .filter((l) => !l.startsWith('Leaked'))
            .slice(0, 6)
            .join(' | ');
          j.report(`${j.what}qemu-img check exited ${rc}: ${text}`);
        }
      }
      if (j.exps.length > 0) {
        const rc = Number(readFileSync(`${out(i)}.convert-rc`, 'utf8'));
        if (rc !== 0)
          j.report(`${j.what}qemu-img convert exited ${rc}: ${readFileSync(`${out(i)}.convert`, 'utf8')}`);
        else {
          const bytes = readFileSync(`${out(i)}.raw`);
          for (const e of j.exps) {
            const m = compareGuest(bytes, e);
            if (m) j.report(`${j.what}qemu-img convert (${e.flushes} flushes done): ${m}`);
          }
        }
      }
    });
  } catch (e) {
    // Never rejects (it runs unawaited for a while): the failure goes to every job of the batch.
    for (const j of jobs) j.report(`qemu-img batch failed: ${(e as Error).message}`);
  } finally {
    for (const name of readdirSync(dir)) {
      if (name.startsWith(`job-${id}-`)) rmSync(join(dir, name), { force: true });
    }
    for (const j of jobs) rmSync(j.file, { force: true });
  }
}

interface Ctx {
  a: LogAnalysis;
  builder: ImageBuilder;
  model: GuestModel;
  dir: string;
  o: PowerLossOptions;
  jobs: QemuJob[];
  /** The batch running in the background (at most one). */
  batch: Promise<void>;
}

/** Checks one crash state in process and queues its qemu-img jobs; problems go to `report`. */
async function checkState(
  c: Ctx,
  st: CrashState,
  n: number,
  report: (problem: string) => void,
): Promise<{ qemu: boolean; continued: boolean; dirty: boolean }> {
  const { a, dir, o } = c;
  const bytes = c.builder.build(st);
  const file = join(dir, 'state.qcow2');
  putFile(file, bytes);
  const exps = [c.model.at(earliestPoint(a, st)), c.model.at(latestPoint(a, st))];
  let dirty = false;
  let failed = false;
  try {
    const g = await readGuest(file, dir);
    dirty = g.dirty;
    if (g.problem) {
      failed = true;
      report(g.problem);
    }
    for (const e of exps) {
      const m = compareGuest(g.bytes, e);
      if (m) {
        failed = true;
        report(`blkexport read (${e.flushes} flushes done): ${m}`);
      }
    }
  } catch (e) {
    failed = true;
    report(`blkexport open/read failed: ${(e as Error).message}`);
  }
  const qemu = n % o.qemuEvery === 0;
  if (qemu) {
    const q = join(dir, `q-${n}.qcow2`);
    putFile(q, bytes);
    c.jobs.push({ file: q, check: !dirty, exps, what: '', report });
  }
  const continued = !failed && (dirty || n % o.continueEvery === 0);
  if (continued) {
    try {
      const m = await continueWriting(file, dir, o.seed + n);
      if (m) report(m);
      else {
        const q = join(dir, `q-${n}-on.qcow2`);
        renameSync(file, q);
        c.jobs.push({ file: q, check: true, exps: [], what: 'after continued writing: ', report });
      }
    } catch (e) {
      report(`continued writing failed: ${(e as Error).message}`);
    }
  }
  if (c.jobs.length >= BATCH) {
    await c.batch;
    c.batch = runBatch(dir, c.jobs.splice(0));
  }
  return { qemu, continued, dirty };
}

/** Records one workload in `dir` and checks its crash states. */
export async function runPowerLoss(dir: string, w: Workload, o: PowerLossOptions): Promise<PowerLossResult> {
  const rec = await recordWorkload(dir, w, o.seed);
  const a = analyzeLog(rec.log.events);
  const res: PowerLossResult = {
    workload: w.name,
    seed: o.seed,
    epochs: a.epochs.length,
    hostWrites: a.ops.filter((x) => x.data).length,
    syncs: a.syncs,
    states: 0,
    qemuChecked: 0,
    continued: 0,
    dirty: 0,
    torn: 0,
    failures: [],
    exercised: [],
  };
  // The recorder saw everything: replaying the whole log gives the file the run left.
  const last = a.epochs.length - 1;
  const everything = buildImage(rec.base, a, {
    epoch: last,
    chosen: new Map(a.epochs[last]!.volatile.map((i) => [i, true])),
    how: 'all',
  });
  if (!everything.equals(rec.final)) {
    res.failures.push('replaying the whole log does not give the final image file');
  }
  for (const [x, y] of overlappingConcurrentWrites(a)) {
    res.failures.push(
      `concurrent overlapping writes ${x.offset}+${x.data!.length} and ${y.offset}+${y.data!.length}`,
    );
  }
  const ctx: Ctx = {
    a,
    builder: new ImageBuilder(rec.base, a),
    model: new GuestModel(a, rec.initial),
    dir,
    o,
    jobs: [],
    batch: Promise.resolve(),
  };
  const states = sampleStates(a, seededRandom(o.seed), {
    random: o.random ?? w.random,
    torn: 0.5,
    max: o.maxStates,
  });
  for (const st of states) {
    const n = res.states++;
    if ([...st.chosen.values()].some((m) => m !== true)) res.torn++;
    const where = describeState(a, st);
    const report = (p: string) => {
      if (res.failures.length < 20) res.failures.push(`${where}: ${p}`);
    };
    const r = await checkState(ctx, st, n, report);
    if (r.qemu) res.qemuChecked++;
    if (r.continued) res.continued++;
    if (r.dirty) res.dirty++;
  }
  await ctx.batch;
  await runBatch(dir, ctx.jobs.splice(0));
  res.exercised = exercised(rec, res);
  return res;
}

/** What the run exercised: moved tables (header fields before and after), compressed clusters, dirty states. */
function exercised(rec: Recording, r: PowerLossResult): Feature[] {
  const out: Feature[] = [];
  const u64 = (b: Buffer, at: number) => b.readBigUInt64BE(at);
  if (u64(rec.base, 40) !== u64(rec.final, 40)) out.push('L1 table moved');
  if (u64(rec.base, 48) !== u64(rec.final, 48)) out.push('refcount table moved');
  if (rec.compressedBefore > 0) out.push('compressed clusters');
  if (r.dirty > 0) out.push('dirty states');
  return out;
}

/** One line per workload result. */
export function summary(r: PowerLossResult): string {
  return (
    `${r.workload}: seed ${r.seed}, ${r.hostWrites} host writes, ${r.syncs} syncs, ${r.epochs} epochs → ` +
    `${r.states} states (${r.torn} torn, ${r.dirty} dirty), ${r.qemuChecked} with qemu-img, ` +
    `${r.continued} written on; exercised: ${r.exercised.join(', ') || '-'}; ${r.failures.length} failures`
  );
}
