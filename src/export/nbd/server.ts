/**
 * The NBD server: listeners (Unix sockets, TCP), the table of exports by
 * name, and the limits that keep hostile clients cheap: connections per
 * server and per export, a handshake deadline, the payload maximum and the
 * requests in flight per connection (defaults below). One connection's
 * failure never reaches another: every connection is its own promise chain
 * whose errors end only that connection.
 */
import { chmod, lstat, unlink } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import type { BlockNode } from '../../block/types.js';
import { BlkError } from '../../errors.js';
import { newExportStats } from '../driver.js';
import { negotiate } from './handshake.js';
import { DEFAULT_MAX_PAYLOAD } from './limits.js';
import type { NbdListen } from './listen.js';
import type { NbdTlsConfig } from './tls.js';
import { serveTransmission } from './transmission.js';
import { Transport } from './transport.js';
import type { NbdExportEntry, NbdLimits, ServerContext } from './types.js';

/** Safe defaults: enough for nbdcopy's and qemu's parallelism, small enough that idle clients cost little. */
export const DEFAULT_LIMITS: NbdLimits = {
  maxPayload: DEFAULT_MAX_PAYLOAD,
  maxInFlight: 16,
  handshakeSeconds: 10,
};
export const DEFAULT_MAX_CONNECTIONS = 1024;
export const DEFAULT_MAX_CONNECTIONS_PER_EXPORT = 64;

export interface NbdServerOptions {
  tls?: NbdTlsConfig | undefined;
  limits?: Partial<NbdLimits>;
  /** Connections the server holds at once, in any phase. */
  maxConnections?: number;
  /** Mode of Unix sockets (default 0600). */
  socketMode?: number;
}

export interface NbdExportOptions {
  name: string;
  description?: string | undefined;
  node: BlockNode;
  writable: boolean;
  maxConnections?: number;
}

/** True when a server accepts connections on the Unix socket `path`. */
export function socketAnswers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = connect(path);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

/** A Unix socket path nobody answers on is stale (a previous server died): it may be removed. */
async function removeStaleSocket(path: string): Promise<void> {
  let st: Awaited<ReturnType<typeof lstat>>;
  try {
    st = await lstat(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new BlkError('USAGE', `'${path}' exists and is not a socket`);
  if (await socketAnswers(path))
    throw new BlkError('EXPORT_EXISTS', `a server is already listening on '${path}'`);
  await unlink(path);
}

export class NbdServer implements ServerContext {
  readonly limits: NbdLimits;
  readonly tls: NbdTlsConfig | undefined;
  shuttingDown = false;
  private readonly exports = new Map<string, NbdExportEntry>();
  private readonly servers: Array<{ server: Server; listen: NbdListen }> = [];
  private readonly sockets = new Set<Socket>();
  /** Connections in transmission per export, to end them when the export goes. */
  private readonly sessions = new Map<NbdExportEntry, Set<{ t: Transport; done: Promise<void> }>>();
  private readonly maxConnections: number;
  private readonly socketMode: number;

  constructor(opts: NbdServerOptions = {}) {
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.tls = opts.tls;
    this.maxConnections = opts.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    this.socketMode = opts.socketMode ?? 0o600;
  }

  /** Starts listening on `l`; resolves with the bound address (a TCP port 0 becomes the real port). */
  async listen(l: NbdListen): Promise<NbdListen> {
    if (l.kind === 'unix') await removeStaleSocket(l.path);
    const server = createServer({ pauseOnConnect: false }, (s) => this.accept(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if (l.kind === 'unix') server.listen(l.path, () => resolve());
      else server.listen(l.port, l.host, () => resolve());
    });
    server.on('error', () => undefined); // accept errors (EMFILE) must not end the process
    let bound = l;
    if (l.kind === 'unix') await chmod(l.path, this.socketMode);
    else {
      const a = server.address();
      if (a && typeof a === 'object') bound = { kind: 'tcp', host: l.host, port: a.port };
    }
    this.servers.push({ server, listen: bound });
    return bound;
  }

  /** The addresses listened on. */
  addresses(): NbdListen[] {
    return this.servers.map((s) => s.listen);
  }

  /** Adds an export; its name must be new. */
  addExport(o: NbdExportOptions): NbdExportEntry {
    if (this.exports.has(o.name))
      throw new BlkError('EXPORT_EXISTS', `NBD export name '${o.name}' is already in use`);
    if (Buffer.byteLength(o.name) > 4096)
      throw new BlkError('EXPORT_INVALID', 'NBD export names are at most 4096 bytes');
    const entry: NbdExportEntry = {
      name: o.name,
      description: o.description,
      node: o.node,
      writable: o.writable,
      stats: newExportStats(),
      connections: 0,
      maxConnections: o.maxConnections ?? DEFAULT_MAX_CONNECTIONS_PER_EXPORT,
    };
    this.exports.set(o.name, entry);
    this.sessions.set(entry, new Set());
    return entry;
  }

  /**
   * Removes an export: new clients no longer find it; connected ones read no
   * further request, get the replies of the requests in flight, and are
   * closed. A connection still open after `drainMs` is cut.
   */
  async removeExport(name: string, drainMs = 10_000): Promise<void> {
    const entry = this.exports.get(name);
    if (!entry) return;
    this.exports.delete(name);
    const live = [...(this.sessions.get(entry) ?? [])];
    for (const s of live) s.t.drain();
    const cut = setTimeout(() => {
      for (const s of live) s.t.close(true);
    }, drainMs);
    cut.unref();
    await Promise.allSettled(live.map((s) => s.done));
    clearTimeout(cut);
    this.sessions.delete(entry);
  }

  find(name: string): NbdExportEntry | undefined {
    return this.exports.get(name);
  }

  list(): NbdExportEntry[] {
    return [...this.exports.values()];
  }

  /** Connections the server holds now (any phase). */
  get connectionCount(): number {
    return this.sockets.size;
  }

  private accept(raw: Socket): void {
    raw.on('error', () => undefined); // a reset connection is that connection's end, nothing more
    if (this.shuttingDown || this.sockets.size >= this.maxConnections) {
      raw.destroy();
      return;
    }
    this.sockets.add(raw);
    raw.once('close', () => this.sockets.delete(raw));
    if (typeof raw.setNoDelay === 'function' && raw.remoteAddress) raw.setNoDelay(true);
    const t = new Transport(raw);
    const deadline = setTimeout(() => t.close(true), this.limits.handshakeSeconds * 1000);
    deadline.unref();
    negotiate(t, this, raw)
      .then(async (neg) => {
        clearTimeout(deadline);
        if (!neg) return;
        const set = this.sessions.get(neg.entry);
        if (!set) {
          neg.entry.connections--;
          t.close(true); // removed while the client was negotiating
          return;
        }
        const session = { t, done: Promise.resolve() };
        session.done = serveTransmission(t, neg, this.limits).finally(() => {
          neg.entry.connections--;
          set.delete(session);
        });
        set.add(session);
        await session.done;
      })
      .catch(() => t.close(true))
      .finally(() => clearTimeout(deadline));
  }

  /** Stops listening, ends every connection (after their running requests) and removes Unix sockets. */
  async close(): Promise<void> {
    this.shuttingDown = true;
    // server.close() resolves once every connection is gone: start it, end the connections, then wait.
    const closed = this.servers.map(
      ({ server }) => new Promise<void>((resolve) => server.close(() => resolve())),
    );
    await Promise.all([...this.exports.keys()].map((n) => this.removeExport(n)));
    for (const s of this.sockets) s.destroy();
    await Promise.all(closed);
    for (const { listen } of this.servers)
      if (listen.kind === 'unix') await unlink(listen.path).catch(() => undefined);
  }
}
