/**
 * A recording filter between the qcow2 driver and its `file` node, like
 * QEMU's blklogwrites: every pwrite (offset and a copy of the bytes), every
 * truncate and every sync (fdatasync) of the image file, in order, each with
 * its start and its end (requests overlap: data writes run concurrently with
 * metadata writes and with background syncs). The qcow2 driver reaches its
 * image file only through its file child (`s.file`), so every byte it puts
 * there — header updates, metadata write-back, data — passes through here.
 * The guest-level operations of the workload are logged into the same
 * sequence (guestOp), so a crash state knows which flushes had completed.
 *
 * Reads pass through; mapHostCached is absent, so no host-fd fast path can
 * bypass the log.
 */
import { defineDriver, type OpenContext } from '../../../src/block/driver.js';
import { qcow2Format } from '../../../src/block/format/qcow2/driver.js';
import { BlockGraph } from '../../../src/block/graph.js';
import { type GraphNode, wrapNode } from '../../../src/block/node.js';
import { makePathPolicy } from '../../../src/block/path-policy.js';
import type { BlockNode } from '../../../src/block/types.js';
import type { GuestOp, LogEvent } from './crash-states.js';

type Started = Exclude<LogEvent, { kind: 'end' }>;
/** A start event without its id (distributes over the union). */
type StartEvent = Started extends infer E ? (E extends Started ? Omit<E, 'id'> : never) : never;

/** The log of one recorded run: host file events and guest markers, in the order they happened. */
export class WriteLog {
  readonly events: LogEvent[] = [];
  private nextId = 0;

  /** Marks the start of a host request; returns its id (the end event carries it). */
  start(e: StartEvent): number {
    const id = this.nextId++;
    this.events.push({ ...e, id } as LogEvent);
    return id;
  }

  end(id: number): void {
    this.events.push({ kind: 'end', id });
  }

  /** Runs a guest operation between its start and end markers. */
  async guest<T>(op: GuestOp, fn: () => Promise<T>): Promise<T> {
    const id = this.start({ kind: 'guest', op });
    const r = await fn();
    this.end(id);
    return r;
  }
}

interface RecState {
  child: BlockNode;
  log: WriteLog;
}

async function logged(log: WriteLog, e: StartEvent, fn: () => Promise<void>) {
  const id = log.start(e);
  await fn();
  log.end(id);
}

const recorder = defineDriver<RecState>({
  name: 'log-writes',
  role: 'filter',
  mutableOptions: [],
  open: () => Promise.reject(new Error('log-writes nodes are made by openRecorded')),
  children: (s) => [s.child],
  length: (s) => s.child.length(),
  read: (s, offset, buf) => s.child.read(offset, buf),
  write: (s, offset, buf) =>
    logged(s.log, { kind: 'write', offset, data: Buffer.from(buf) }, () => s.child.write(offset, buf)),
  flush: (s) => logged(s.log, { kind: 'sync' }, () => s.child.flush()),
  truncate: (s, size) => logged(s.log, { kind: 'truncate', size }, () => s.child.truncate(size)),
  refreshLength: (s) => s.child.refreshLength?.(),
  allocatedSize: (s) => s.child.allocatedSize(),
  isReadOnly: (s) => s.child.readOnly,
  capabilities: () => ({ discard: false }),
});

export interface RecordedImage {
  node: BlockNode;
  close(): Promise<void>;
}

/**
 * Opens `filename` as a writable qcow2 node whose file child is the recorder.
 * The graph is put together by hand (the registry has no recording driver);
 * backing files still open through the graph, confined to `roots`.
 */
export async function openRecorded(filename: string, log: WriteLog, roots: string[]): Promise<RecordedImage> {
  const policy = await makePathPolicy(roots);
  const graph = new BlockGraph(policy);
  let node: GraphNode | undefined;
  try {
    const file = await graph.openNode({ driver: 'file', nodeName: 'img-file', filename, readOnly: false });
    const rec = wrapNode(
      recorder,
      { child: file, log },
      { nodeName: 'img-log', readOnly: false, filename: file.filename, fileKey: file.fileKey },
    );
    const ctx: OpenContext = {
      nodeName: 'img',
      readOnly: false,
      options: { driver: 'qcow2' },
      file: rec,
      backing: undefined,
      policy,
      chain: { depth: 0, seen: new Set() },
      openChild: (o, chain) => graph.openNode(o, chain),
    };
    const state = await qcow2Format.open(ctx);
    node = wrapNode(qcow2Format, state, { nodeName: 'img', readOnly: false, filename: file.filename });
  } catch (e) {
    await graph.close().catch(() => undefined);
    throw e;
  }
  const opened = node;
  return {
    node: opened,
    async close() {
      try {
        await opened.close();
      } finally {
        await graph.close();
      }
    },
  };
}
