/**
 * What the reconciler asks of an engine: report what it has (observe) and
 * apply one plan step at a time. The native engine serves exports in this
 * process; a qemu engine would drive qemu-storage-daemon with the same steps.
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
}
