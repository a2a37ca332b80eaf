/** The agent scale figures of one bench run (bench/scale.ts), each count measured alone, failures reported in place. */
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
  for (const n of counts) {
    try {
      outcomes.push(await measureScale({ dir, cleanup, exports: n, log }));
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
