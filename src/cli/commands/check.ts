/**
 * `blkexport check IMAGE [-r leaks|all] [-o json]`: qcow2 consistency check
 * and repair with qemu-img check's counters, messages and exit codes
 * (0 clean, 1 check failed, 2 corruptions, 3 leaks only).
 */
import { resolve } from 'node:path';
import { type CheckResult, checkImage, type RepairMode } from '../../block/format/qcow2/check.js';
import { stateOf } from '../../block/format/qcow2/inspect.js';
import { prepareWritable } from '../../block/format/qcow2/writable.js';
import { openImage } from '../../block/open-image.js';
import { BlkError } from '../../errors.js';
import { parseCommandArgs } from '../args.js';

export const summary = 'check a qcow2 image for leaks and corruptions (and repair them)';
export const usage = `usage: blkexport check IMAGE [-r leaks|all] [-o human|json] [-f qcow2]

Counts every reference the image's tables make and compares them with the
stored refcounts, like \`qemu-img check\`. Exit status: 0 clean, 1 the check
could not run, 2 corruptions, 3 leaked clusters only.

options:
  -r, --repair WHAT   leaks: drop leaked refcounts; all: also fix corruptions
  -o, --output FMT    human (default) or json (qemu-img's names)
  -f, --format qcow2  the image format (probed otherwise)
`;

function progressBar(): ((f: number) => void) | undefined {
  if (!process.stderr.isTTY) return undefined;
  let last = -1;
  return (f) => {
    const pct = Math.floor(f * 10000) / 100;
    if (pct === last) return;
    last = pct;
    process.stderr.write(`    (${pct.toFixed(2)}/100%)\r`);
  };
}

function pct(n: number, d: number): string {
  return (d === 0 ? 0 : (100 * n) / d).toFixed(2);
}

function summaryLines(r: CheckResult): string[] {
  const out: string[] = [];
  if (r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0)
    out.push('No errors were found on the image.');
  if (r.corruptions > 0) {
    out.push('', `${r.corruptions} errors were found on the image.`);
    out.push('Data may be corrupted, or further writes to the image may corrupt it.');
  }
  if (r.leaks > 0) {
    out.push('', `${r.leaks} leaked clusters were found on the image.`);
    out.push('This means waste of disk space, but no harm to data.');
  }
  out.push(
    `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ${pct(r.fragmentedClusters, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters, r.allocatedClusters)}% compressed clusters`,
  );
  out.push(`Image end offset: ${r.imageEndOffset}`);
  return out;
}

function json(r: CheckResult, fixed: CheckResult | undefined, filename: string): Record<string, unknown> {
  // Key order as qemu-img prints it.
  const o: Record<string, unknown> = { 'image-end-offset': r.imageEndOffset };
  if (r.compressedClusters) o['compressed-clusters'] = r.compressedClusters;
  o['total-clusters'] = r.totalClusters;
  if (r.corruptions) o.corruptions = r.corruptions;
  o['check-errors'] = r.checkErrors;
  if (r.leaks) o.leaks = r.leaks;
  if (fixed?.leaksFixed) o['leaks-fixed'] = fixed.leaksFixed;
  if (fixed?.corruptionsFixed) o['corruptions-fixed'] = fixed.corruptionsFixed;
  o['allocated-clusters'] = r.allocatedClusters;
  o.filename = filename;
  o.format = 'qcow2';
  if (r.fragmentedClusters) o['fragmented-clusters'] = r.fragmentedClusters;
  return o;
}

/** The exit status qemu-img check would give. */
export function checkExitCode(r: CheckResult): number {
  if (r.checkErrors > 0) return 1;
  if (r.corruptions > 0) return 2;
  if (r.leaks > 0) return 3;
  return 0;
}

/** Runs `blkexport check`. */
export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('check', args, {
    repair: { type: 'string', short: 'r' },
    output: { type: 'string', short: 'o', default: 'human' },
    format: { type: 'string', short: 'f', default: 'auto' },
  });
  if (positionals.length !== 1)
    throw new BlkError('USAGE', 'check needs exactly one IMAGE (see blkexport check --help)');
  const mode = (values.repair ?? 'none') as RepairMode;
  if (mode !== 'none' && mode !== 'leaks' && mode !== 'all') {
    throw new BlkError('USAGE', `unknown repair mode '${values.repair}' (leaks or all)`);
  }
  if (values.output !== 'human' && values.output !== 'json') {
    throw new BlkError('USAGE', `unknown output format '${values.output}'`);
  }
  const format = values.format;
  if (format !== 'auto' && format !== 'qcow2')
    throw new BlkError('USAGE', 'check supports qcow2 images only');
  const filename = positionals[0]!;
  const img = await openImage({ filename: resolve(filename), format, readOnly: true, backing: 'none' });
  try {
    if (img.format !== 'qcow2') {
      console.error(`blkexport check: this image format (${img.format}) does not support checks`);
      return 63;
    }
    const s = stateOf(img.node);
    const progress = progressBar();
    if (mode !== 'none') {
      s.repairing = true;
      await img.node.reopen({ readOnly: false });
      await prepareWritable(s);
    }
    const first = await checkImage(s, mode, progress);
    let final = first;
    const repaired = first.leaksFixed + first.corruptionsFixed > 0;
    if (repaired) final = await checkImage(s, 'none', progress);
    if (progress) process.stderr.write('\n');
    for (const m of final === first ? first.messages : [...first.messages, ...final.messages])
      console.error(m);
    if (values.output === 'json') {
      console.log(JSON.stringify(json(final, first, filename), null, 4));
    } else {
      const lines: string[] = [];
      if (repaired) {
        lines.push('The following inconsistencies were found and repaired:', '');
        lines.push(
          `    ${first.leaksFixed} leaked clusters`,
          `    ${first.corruptionsFixed} corruptions`,
          '',
        );
        lines.push('Double checking the fixed image now...');
      }
      lines.push(...summaryLines(final));
      console.log(lines.join('\n'));
    }
    return checkExitCode(final);
  } finally {
    await img.close();
  }
}
