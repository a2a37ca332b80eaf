/** What the NBD protocol code sees of the server: its exports, its limits, its TLS. */
import type { BlockNode } from '../../block/types.js';
import type { ExportStats } from '../driver.js';
import type { NbdTlsConfig } from './tls.js';

/** One export as the NBD server serves it. */
export interface NbdExportEntry {
  /** The NBD export name clients ask for. */
  readonly name: string;
  readonly description: string | undefined;
  readonly node: BlockNode;
  writable: boolean;
  readonly stats: ExportStats;
  /** Connections in transmission phase on this export right now. */
  connections: number;
  /** At most this many at once; more are refused in the handshake. */
  maxConnections: number;
}

/** The server-wide limits (safe defaults in server.ts). */
export interface NbdLimits {
  /** Largest READ/WRITE payload accepted and advertised (NBD_INFO_BLOCK_SIZE maximum). */
  maxPayload: number;
  /** Requests of one connection running at once; the next header is read when one finishes. */
  maxInFlight: number;
  /** Seconds a client may take from connect to transmission phase. */
  handshakeSeconds: number;
}

/** What one connection needs from the server. */
export interface ServerContext {
  find(name: string): NbdExportEntry | undefined;
  list(): NbdExportEntry[];
  readonly tls: NbdTlsConfig | undefined;
  readonly limits: NbdLimits;
  readonly shuttingDown: boolean;
}
