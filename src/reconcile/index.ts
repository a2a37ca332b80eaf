/** The reconciler's pure core: desired state, diff, host plan and plan rendering. */
export { changedReason, compareExports, compareNodes, EXPORT_MOUNT_TIME_OPTIONS } from './compare.js';
export { desiredFromManifests } from './desired.js';
export { diff } from './diff.js';
export { hostPlanInputs, isRemoval, observedOfEngine, planEngines } from './host-plan.js';
export type * from './model.js';
export { EMPTY_OBSERVED } from './model.js';
export {
  describeExport,
  describeNode,
  planHasChanges,
  planToJson,
  renderPlan,
  renderStep,
} from './render.js';
export { deriveWritability } from './writability.js';
