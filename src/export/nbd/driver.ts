/**
 * The NBD export type as an export driver: an export is one entry in a
 * host-level NBD server (the agent's, started elsewhere), claimed by its
 * NBD export name. Starting adds the entry; stopping removes it (clients
 * connected to it get the replies of their requests in flight, then are
 * closed) and flushes the node when the export could write. Nothing changes
 * in place: a changed option replaces the export.
 */
import type { BlockNode } from '../../block/types.js';
import { BlkError } from '../../errors.js';
import type { ExportDriver, ExportDriverOptions, ExportStats, LiveExport } from '../driver.js';
import type { NbdServer } from './server.js';
import type { NbdExportEntry } from './types.js';

export interface NbdDriverOptions extends ExportDriverOptions {
  /** The NBD export name clients ask for. */
  name: string;
  description?: string | undefined;
  /** The server the export is added to. */
  server: NbdServer;
}

/** One NBD export while its entry is in the server. */
export class NbdLiveExport implements LiveExport<NbdDriverOptions> {
  readonly type = 'nbd';
  onError: ((op: string, err: unknown) => void) | undefined;

  constructor(
    readonly id: string,
    readonly node: BlockNode,
    private readonly server: NbdServer,
    readonly entry: NbdExportEntry,
  ) {}

  get isWritable(): boolean {
    return this.entry.writable;
  }

  get stats(): ExportStats {
    return this.entry.stats;
  }

  /** Clients in transmission phase on this export now. */
  get connections(): number {
    return this.entry.connections;
  }

  get name(): string {
    return this.entry.name;
  }

  /** The server still has this entry under its name (nothing removed or replaced it). */
  get served(): boolean {
    return this.server.find(this.entry.name) === this.entry;
  }

  reopen(): Promise<void> {
    return Promise.reject(new BlkError('NOT_SUPPORTED', `NBD export '${this.id}' changes nothing in place`));
  }

  /** Every request goes to the node; there is no cache to distrust. */
  setShared(): void {}

  async stop(): Promise<void> {
    await this.server.removeExport(this.entry.name);
    if (this.entry.writable) await this.node.flush();
  }
}

export const nbdExportDriver: ExportDriver<NbdDriverOptions, NbdLiveExport> = {
  type: 'nbd',
  mutableOptions: [],
  claim: (o) => ({ key: `nbd-name:${o.name}`, taken: `NBD export name '${o.name}' is already in use` }),
  async start(node, o) {
    const entry = o.server.addExport({
      name: o.name,
      description: o.description,
      node,
      writable: o.writable,
    });
    return new NbdLiveExport(o.id, node, o.server, entry);
  },
};
