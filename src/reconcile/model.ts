/**
 * The reconciler's vocabulary: the desired state (from manifests), the observed
 * state (what an engine reports), and the plan of steps between them. Options
 * keep QEMU's QAPI spelling (`node-name`, `read-only`, `allow-other`).
 */
import type { EngineName, ExportOptions, NodeOptions, SourcePos } from '../manifest/types.js';

export type { EngineName, ExportOptions, NodeOptions, SourcePos };

/** Where a desired node or export was declared. */
export interface Origin extends SourcePos {
  /** metadata.name of the manifest document. */
  manifest: string;
  /** For nodes the user did not name: why the node exists ("shorthand export foo", "inline file of fmt0"). */
  generatedFor?: string;
}

/** A node the manifests ask for. */
export interface DesiredNode {
  options: NodeOptions;
  origin: Origin;
}

/** An export the manifests ask for. */
export interface DesiredExport {
  options: ExportOptions;
  origin: Origin;
  /** Written as shorthand (`image:`). */
  shorthand: boolean;
}

/** The union of the valid manifests for this host; nodes in declaration order. */
export interface Desired {
  nodes: DesiredNode[];
  exports: DesiredExport[];
}

/**
 * A node as an engine reports it: the options it was opened with, exactly as
 * its add/reopen step gave them (an `auto` driver stays `auto`, so an applied
 * plan diffs to nothing); what the engine resolved goes in `resolved`.
 */
export interface ObservedNode {
  options: NodeOptions;
  resolved?: { driver?: string; offset?: number; size?: number };
  /** Set when the node no longer matches what it opened ("image file replaced"): the plan replaces it. */
  drift?: string;
  /** The engine that reports it (set where several engines' states are joined). */
  engine?: EngineName;
}

/**
 * mounted: in the kernel's mount table and served; unmounted: missing from it;
 * stale: ENOTCONN; held: mounted, its connection kept for this engine by the
 * fd holder while no process serves it (a previous agent's): clients wait.
 */
export type ExportState = 'mounted' | 'unmounted' | 'stale' | 'held';

/** An export as an engine reports it: the options of its add/reopen step, and its state. */
export interface ObservedExport {
  options: ExportOptions;
  state: ExportState;
  /** Free text for stale/unmounted (shown in the plan). */
  reason?: string;
  /** The engine that reports it (set where several engines' states are joined). */
  engine?: EngineName;
}

/** What the engine has: only nodes and exports that plan steps created. */
export interface Observed {
  nodes: ObservedNode[];
  exports: ObservedExport[];
}

/**
 * The names an incremental pass looks at (agent/pass-scope.ts): observe,
 * plan and apply stay within them; absent, a pass looks at everything.
 */
export interface Scope {
  nodes: ReadonlySet<string>;
  exports: ReadonlySet<string>;
}

/** Nothing open, nothing mounted. */
export const EMPTY_OBSERVED: Observed = Object.freeze({ nodes: [], exports: [] }) as Observed;

/**
 * What an engine can change in place, so that the plan (not the engine)
 * decides between "reopen in place" and "replace": QEMU's mutable_opts,
 * Terraform's RequiresReplace.
 */
export interface EngineCapabilities {
  readonly engine: EngineName;
  /** Node options a reopen changes in place, for a node of `driver`. */
  nodeMutable(driver: string): readonly string[];
  /** Export options a reopen changes in place, for an export of `type`; others replace the export. */
  exportMutable(type: string): readonly string[];
  /** Export options this engine changes by remounting (a replace the plan names as such). */
  exportRemounted?(type: string): readonly string[];
  /**
   * false: a file node cannot be reopened while one of this engine's exports
   * is mounted over its filename (the engine would open its own mount), so
   * such exports are replaced around the reopen.
   */
  readonly reopenUnderOwnMount: boolean;
}

/** One option that differs: its name, the observed value, the desired value. */
export interface Change {
  option: string;
  from: unknown;
  to: unknown;
}

/** Why an entity is removed and added again. */
export interface Replacement {
  /** Human reason, naming what forces the replacement: "filename changed", "node prot0 replaced". */
  reason: string;
  /** All of the entity's own option changes (empty when replaced only because of a child). */
  changes: Change[];
}

/**
 * One step of a plan. Engines apply steps in order; add/reopen/repair steps
 * carry the full desired options, remove steps the observed ones.
 */
export type Step = { engine: EngineName } & (
  | { action: 'remove-export'; export: ExportOptions; replace?: Replacement }
  | { action: 'remove-node'; node: NodeOptions; replace?: Replacement }
  | { action: 'reopen-export'; export: ExportOptions; changes: Change[]; origin: Origin }
  | { action: 'reopen-node'; node: NodeOptions; changes: Change[]; origin: Origin }
  | { action: 'add-node'; node: NodeOptions; origin: Origin; replace?: Replacement }
  | { action: 'add-export'; export: ExportOptions; origin: Origin; replace?: Replacement }
  | {
      action: 'adopt-export';
      /** The desired options (mutable ones that differ from the held export's are applied on adoption). */
      export: ExportOptions;
      origin: Origin;
      changes: Change[];
      /** What was observed of the held connection ("held since T, mounted by pid N"). */
      reason?: string;
    }
  | {
      action: 'repair-export';
      export: ExportOptions;
      origin: Origin;
      /** What was observed. */
      state: Exclude<ExportState, 'mounted'>;
      reason?: string;
      /** Mutable options that change with the remount. */
      changes: Change[];
    }
);

/** `add-node`, `remove-export`, ... */
export type StepAction = Step['action'];

/** Counts of entities (nodes and exports) per kind of change. */
export interface PlanSummary {
  add: number;
  reopen: number;
  replace: number;
  remove: number;
  repair: number;
  adopt: number;
}

/** An ordered list of steps; empty when the observed state already matches. */
export interface Plan {
  steps: Step[];
  summary: PlanSummary;
}
