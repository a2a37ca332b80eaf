/** The agent scale figures of one bench run (bench/scale.ts), each count measured alone, failures reported in place. */
import { readFile } from 'node:fs/promises';
import { describeError } from '../src/errors.js';
import type { Cleanup } from './cleanup.js';
import {
  measureScale,
  measureValidate,
  renderScaleSection,
  type ScaleOutcome,
  type ValidateFigure,
} from './scale.js';

/** Exports in the manifest that `validate` is timed on. */
const VALIDATE_EXPORTS = 20_000;

/** Resident MiB per export assumed before one count was measured. */
const GUESS_MIB_PER_EXPORT = 5;

async function memAvailableMiB(): Promise<number> {
  const text = await readFile('/proc/meminfo', 'utf8');
  return Number(/MemAvailable:\s+(\d+)/.exec(text)?.[1] ?? 0) / 1024;
}

export async function runScale(
  counts: readonly number[],
  dir: string,
  cleanup: Cleanup,
  log: (msg: string) => void,
): Promise<
  { section: string; json: { outcomes: ScaleOutcome[]; validate: ValidateFigure | string } } | undefined
> {
  if (!counts.length) return undefined;
  const outcomes: ScaleOutcome[] = [];
  let perExport = GUESS_MIB_PER_EXPORT;
  for (const n of counts) {
    // An agent the machine cannot hold would take the OOM killer to everything else on it.
    const need = n * perExport;
    const avail = await memAvailableMiB();
    if (need > 0.7 * avail) {
      const reason = `skipped: ${n} exports would need about ${Math.round(need)} MiB resident (${perExport.toFixed(1)} MiB each), ${Math.round(avail)} MiB available`;
      log(`scale ${n}: ${reason}`);
      outcomes.push({ exports: n, measured: false, reason });
      continue;
    }
    try {
      const o = await measureScale({ dir, cleanup, exports: n, log });
      if (o.measured) perExport = o.figures.rssMiB / n;
      outcomes.push(o);
    } catch (e) {
      const reason = `failed: ${describeError(e).replaceAll(dir, '$TMP')}`;
      log(`scale ${n}: ${reason}`);
      outcomes.push({ exports: n, measured: false, reason });
    }
  }
  let validate: ValidateFigure | string;
  try {
    validate = await measureValidate(dir, VALIDATE_EXPORTS, cleanup);
    log(`validate of ${VALIDATE_EXPORTS} exports: ${validate.seconds.toFixed(2)} s`);
  } catch (e) {
    validate = `failed: ${describeError(e).replaceAll(dir, '$TMP')}`;
  }
  return { section: `\n${renderScaleSection(outcomes, validate)}`, json: { outcomes, validate } };
}
