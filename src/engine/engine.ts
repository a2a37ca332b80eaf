/**
 * What the agent asks of an engine: its capabilities (read by the plan),
 * what it has (observe), and one plan step at a time (apply). The native
 * engine serves exports in this process; the qemu engine drives
 * qemu-storage-daemon. Both are the shared step core (core.ts) over a driver
 * that fills in the engine-specific half of each step. observe() reports each
 * node and export with exactly the options its add/reopen step gave (an
 * applied plan diffs to nothing), and only what plan steps created.
 */
import type { ExportStats } from '../export/driver.js';
import type { EngineCapabilities, EngineName, Observed, Scope, Step } from '../reconcile/model.js';

/** A live export as status and metrics show it. */
export interface EngineExport {
  id: string;
  type: string;
  /** FUSE exports: where it is mounted. */
  mountpoint?: string;
  /** NBD exports: the export name, and the clients connected to it now. */
  nbdName?: string;
  connections?: number;
  /** node-names from the exported node down through file and backing children. */
  nodeChain: string[];
  stats: ExportStats | undefined;
  /** Served by this process since (ISO). */
  servedSince?: string;
  /** Adopted from a previous agent process (its connection was kept). */
  adopted: boolean;
}

/** An engine: capabilities, observe, apply steps, list live exports, shut down. */
export interface Engine {
  readonly name: EngineName;
  /** What this engine changes in place; the plan reads it, the engine never decides. */
  readonly capabilities: EngineCapabilities;
  /**
   * The nodes and exports that plan steps created, each export's mount state,
   * each node's drift; with `scope`, only those it names (an incremental pass).
   */
  observe(scope?: Scope): Promise<Observed>;
  /** Carries out one step; throws a BlkError when it cannot, leaving the engine consistent. */
  apply(step: Step): Promise<void>;
  /** Live exports (for status and metrics). */
  exports(): EngineExport[];
  /** The ids of the live exports (cheap: no statistics, no node chains). */
  exportIds(): string[];
  /** Removes every export (flush, unmount) and closes every node. */
  shutdown(): Promise<void>;
  /**
   * Leaves every export serving for the next agent instead: flushes, keeps
   * every mount, and lets go of the engine (the agent process then exits).
   */
  handover(): Promise<void>;
}
