/**
 * What the reconciler asks of an engine: report what it has (observe) and
 * apply one plan step at a time. The native engine serves exports in this
 * process; the qemu engine drives qemu-storage-daemon with the same steps.
 * Both get the same diff: observe() must report each node and export with
 * exactly the options its add/reopen step gave (an applied plan diffs to
 * nothing), and only what plan steps created.
 */
import type { ExportStats } from '../export/fuse/export.js';
import type { Observed, Step } from '../reconcile/model.js';

/** A live export as status and metrics show it. */
export interface EngineExport {
  id: string;
  mountpoint: string;
  /** node-names from the exported node down to the protocol node(s). */
  nodeChain: string[];
  stats: ExportStats | undefined;
}

/** An engine: observe, apply steps, list live exports, shut down. */
export interface Engine {
  readonly name: 'native' | 'qemu';
  /** The nodes and exports that plan steps created, with each export's state in the kernel's mount table. */
  observe(): Promise<Observed>;
  /** Applies one step; throws a BlkError when it cannot, leaving the engine consistent. */
  apply(step: Step): Promise<void>;
  /** Live exports (for status and metrics). */
  exports(): EngineExport[];
  /** Removes every export (flush, unmount) and closes every node. */
  shutdown(): Promise<void>;
  /** File nodes whose image was replaced or removed under them (the agent replaces them); optional. */
  driftedNodes?(): Promise<{ nodeName: string; reason: string }[]>;
}
