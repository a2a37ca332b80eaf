/**
 * Carries out a host plan step by step, each on its engine. A failing step
 * fails only the exports it touches (and, in this pass, whatever is built on
 * its node); the others proceed. Exports waiting for their retry are left
 * out of additions. Decides nothing the plan decided: it only skips.
 */

import type { Engine } from '../engine/engine.js';
import { describeError, isTerminal } from '../errors.js';
import { childrenOf, NodeGraph } from '../manifest/graph.js';
import type { Desired, Plan, Step } from '../reconcile/model.js';
import type { Logger } from './log.js';

/** A step failure that fails `exports`; `terminal` when retrying it is pointless until something changes. */
export interface StepFailure {
  exports: string[];
  reason: string;
  terminal: boolean;
}

export interface ApplyResult {
  applied: number;
  failures: StepFailure[];
}

function stepNode(step: Step): string | undefined {
  return 'node' in step ? step.node['node-name'] : undefined;
}

function stepChildren(step: Step): string[] {
  if (step.action === 'add-node') return childrenOf(step.node).map((c) => c.name);
  if (step.action === 'add-export') return [step.export['node-name']];
  return [];
}

const ADDING: ReadonlySet<Step['action']> = new Set(['add-node', 'add-export', 'repair-export']);

/** One run of a plan: which exports each node serves, and which nodes broke on the way. */
class PlanRun {
  readonly result: ApplyResult = { applied: 0, failures: [] };
  private readonly usersOf = new Map<string, string[]>();
  private readonly brokenNodes = new Map<string, StepFailure>();

  constructor(
    private readonly engines: ReadonlyMap<string, Engine>,
    desired: Desired,
    private readonly waiting: (exportId: string) => boolean,
    private readonly log: Logger,
  ) {
    const graph = new NodeGraph(desired.nodes.map((n) => n.options));
    for (const e of desired.exports)
      for (const n of graph.below(e.options['node-name']))
        this.usersOf.set(n, [...(this.usersOf.get(n) ?? []), e.options.id]);
  }

  async step(step: Step): Promise<void> {
    const node = stepNode(step);
    const exportId = 'export' in step ? step.export.id : undefined;
    const touched = exportId !== undefined ? [exportId] : (this.usersOf.get(node!) ?? []);
    // Additions for exports that wait for their retry are left for a later pass.
    if (ADDING.has(step.action) && touched.length > 0 && touched.every(this.waiting)) return;
    const blockedBy = stepChildren(step).find((c) => this.brokenNodes.has(c));
    if (blockedBy !== undefined) {
      const cause = this.brokenNodes.get(blockedBy)!;
      if (node) this.brokenNodes.set(node, cause);
      this.result.failures.push({ ...cause, exports: touched });
      return;
    }
    try {
      await this.engines.get(step.engine)!.apply(step);
      this.result.applied++;
      this.log.info('applied', {
        step: step.action,
        ...(node ? { node } : {}),
        ...(exportId ? { export: exportId } : {}),
        ...(step.engine !== 'native' ? { engine: step.engine } : {}),
        ...('replace' in step && step.replace ? { replace: step.replace.reason } : {}),
      });
    } catch (e) {
      const what = node ? ` ${node}` : exportId ? ` ${exportId}` : '';
      const failure = {
        exports: touched,
        reason: `${step.action}${what}: ${describeError(e)}`,
        terminal: isTerminal(e),
      };
      if (node && step.action !== 'remove-node') this.brokenNodes.set(node, failure);
      if (touched.length) this.result.failures.push(failure);
      else this.log.error('step failed', { step: step.action, engine: step.engine, reason: failure.reason });
    }
  }
}

/** Applies `plan` on `engines`; `desired` (every engine's) tells which exports each node serves. */
export async function applyPlan(
  plan: Plan,
  engines: readonly Engine[],
  desired: Desired,
  waiting: (exportId: string) => boolean,
  log: Logger,
): Promise<ApplyResult> {
  const run = new PlanRun(new Map(engines.map((e) => [e.name, e])), desired, waiting, log);
  for (const step of plan.steps) await run.step(step);
  return run.result;
}
