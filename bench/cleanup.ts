/**
 * One place that undoes everything the benchmark set up (mounts, servers,
 * images), in reverse order, exactly once: on success, on an exception and on
 * Ctrl-C / SIGTERM.
 */
import { BlkError, describeError } from '../src/errors.js';
import { killAbortable } from './proc.js';

type Step = { label: string; fn: () => Promise<void> | void };

export class Cleanup {
  private steps: Step[] = [];
  private running: Promise<void> | undefined;

  /**
   * Registers an undo step; the returned function runs it now (and unregisters it).
   * Register before starting what it undoes; once cleaning has begun, nothing new may start.
   */
  add(label: string, fn: () => Promise<void> | void): () => Promise<void> {
    if (this.running) throw new BlkError('INTERNAL', `not starting ${label}: the run is being cleaned up`);
    const step: Step = { label, fn };
    this.steps.push(step);
    return async () => {
      const i = this.steps.indexOf(step);
      if (i < 0) return;
      this.steps.splice(i, 1);
      await step.fn();
    };
  }

  /** True once cleaning has begun (after a signal): the run must start nothing new. */
  get aborting(): boolean {
    return this.running !== undefined;
  }

  /** Runs every remaining step, last registered first; a failing step is reported and the rest still run. */
  runAll(): Promise<void> {
    this.running ??= (async () => {
      while (this.steps.length) {
        const step = this.steps.pop()!;
        try {
          await step.fn();
        } catch (e) {
          process.stderr.write(`bench: cleanup of ${step.label} failed: ${describeError(e)}\n`);
        }
      }
    })();
    return this.running;
  }
}

/** Makes SIGINT/SIGTERM/SIGHUP end the run through `cleanup` (a second signal exits at once). */
export function cleanUpOnSignals(cleanup: Cleanup): void {
  let signalled = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (signalled) {
      process.stderr.write(`bench: ${sig} again: exiting without finishing the cleanup\n`);
      process.exit(130);
    }
    signalled = true;
    process.stderr.write(`\nbench: ${sig}: stopping servers and removing the images (again to force)\n`);
    killAbortable();
    cleanup.runAll().finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
  };
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, onSignal);
}
