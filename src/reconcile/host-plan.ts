/**
 * One plan for a host with several engines: each engine gets its own desired
 * subset (the documents that name it, or the default engine), its own observed
 * state and its own diff under its own capabilities. Pure, like diff().
 */
import type { EngineName, ManifestFile } from '../manifest/types.js';
import { desiredFromManifests } from './desired.js';
import { diff } from './diff.js';
import type { Desired, EngineCapabilities, Observed, Plan, PlanSummary, Step } from './model.js';

/** One engine's share of a host plan. */
export interface EnginePlanInput {
  caps: EngineCapabilities;
  desired: Desired;
  observed: Observed;
}

/** Removal steps come first in every engine's plan (diff's order). */
export function isRemoval(step: Step): boolean {
  return step.action === 'remove-export' || step.action === 'remove-node';
}

/**
 * The engines' plans as one: removals of every engine first, so an export
 * moving between engines frees its mountpoint before it is added, then the
 * other steps, engine by engine.
 */
export function planEngines(inputs: readonly EnginePlanInput[]): Plan {
  const plans = inputs.map((i) => diff(i.desired, i.observed, i.caps));
  const summary: PlanSummary = { add: 0, reopen: 0, replace: 0, remove: 0, repair: 0, adopt: 0 };
  for (const p of plans)
    for (const k of Object.keys(summary) as (keyof PlanSummary)[]) summary[k] += p.summary[k];
  return {
    steps: [
      ...plans.flatMap((p) => p.steps.filter(isRemoval)),
      ...plans.flatMap((p) => p.steps.filter((s) => !isRemoval(s))),
    ],
    summary,
  };
}

/** The part of a joined observed state (entries tagged with their engine) that `engine` reports. */
export function observedOfEngine(observed: Observed, engine: EngineName, fallback: EngineName): Observed {
  return {
    nodes: observed.nodes.filter((n) => (n.engine ?? fallback) === engine),
    exports: observed.exports.filter((e) => (e.engine ?? fallback) === engine),
  };
}

/** The inputs of planEngines for manifests and a joined observed state: one per engine in `caps`. */
export function hostPlanInputs(
  files: readonly ManifestFile[],
  hostname: string | undefined,
  observed: Observed,
  caps: readonly EngineCapabilities[],
  fallback: EngineName,
): EnginePlanInput[] {
  return caps.map((c) => ({
    caps: c,
    desired: desiredFromManifests(files, {
      ...(hostname !== undefined ? { hostname } : {}),
      engine: { name: c.engine, fallback },
    }),
    observed: observedOfEngine(observed, c.engine, fallback),
  }));
}
