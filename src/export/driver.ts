/**
 * The export driver contract. An export type (FUSE, NBD) is one
 * object like a block driver: its type name, the options a reopen changes in
 * place, the resource only one export may hold, and start(). A live export
 * sees one block node, never the graph; the checks every type shares live
 * once in the export core (registry.ts).
 */
import type { BlockNode } from '../block/types.js';
import { LatencyHistogram } from './latency.js';

/** Counters every export keeps for status and metrics (plain increments: nothing on the hot path allocates). */
export interface ExportStats {
  reads: number;
  readBytes: number;
  writes: number;
  writeBytes: number;
  flushes: number;
  errors: number;
  readLatency: LatencyHistogram;
  writeLatency: LatencyHistogram;
  /** The kernel does this export's reads and writes on the image file (FUSE passthrough): they are not counted here. */
  passthrough?: boolean;
  /** Why the last request answered EIO failed (status shows it with the error count). */
  lastError?: string;
}

/** Fresh counters for a new export. */
export function newExportStats(): ExportStats {
  return {
    reads: 0,
    readBytes: 0,
    writes: 0,
    writeBytes: 0,
    flushes: 0,
    errors: 0,
    readLatency: new LatencyHistogram(),
    writeLatency: new LatencyHistogram(),
  };
}

/** Options every export type has. */
export interface ExportDriverOptions {
  id: string;
  writable: boolean;
}

/** A running export, whatever its type. */
export interface LiveExport<O extends ExportDriverOptions = ExportDriverOptions> {
  readonly id: string;
  readonly type: string;
  readonly node: BlockNode;
  readonly isWritable: boolean;
  readonly stats: ExportStats;
  /** Called with every failure answered as EIO (the owner logs it). */
  onError?: ((op: string, err: unknown) => void) | undefined;
  /** Applies the driver's mutable options of `opts` in place. */
  reopen(opts: O): Promise<void>;
  /**
   * Another export shares a node with this one and one of the two can write:
   * a type that caches what the node maps to must stop trusting its cache.
   */
  setShared(shared: boolean): void;
  /** Flushes (when writable) and stops serving. */
  stop(): Promise<void>;
}

/** One export type (`E`: the live export it starts; `H`: a kept connection it can adopt). */
export interface ExportDriver<
  O extends ExportDriverOptions = ExportDriverOptions,
  E extends LiveExport<O> = LiveExport<O>,
  H = never,
> {
  readonly type: string;
  /** Options (manifest spelling) a reopen changes in place; any other change replaces the export. */
  readonly mutableOptions: readonly string[];
  /** The resource only one export may hold (a FUSE mountpoint), with the message when it is taken. */
  claim(opts: O): { key: string; taken: string } | undefined;
  /** Starts serving `node`; the core has checked the id, the claim and that a writable export can write. */
  start(node: BlockNode, opts: O): Promise<E>;
  /** Serves a connection a previous process started and another one kept (absent: the type cannot). */
  adopt?(node: BlockNode, opts: O, held: H): Promise<E>;
}
