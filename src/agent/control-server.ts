/**
 * The agent's control socket: HTTP with JSON over a Unix socket (mode 0600,
 * so only root talks to it). GET /status, GET /metrics, POST /reconcile.
 * Each connection's peer credentials (SO_PEERCRED) are checked too, so a
 * socket whose mode was loosened by hand still answers only root (and the
 * agent's own user): others get 403.
 */
import { chmod, mkdir, unlink } from 'node:fs/promises';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { dirname } from 'node:path';
import { nativeHelper } from '../block/lock-native.js';
import { BlkError, describeError } from '../errors.js';
import { socketAnswers } from '../export/nbd/server.js';

export interface ControlHandlers {
  status(): unknown;
  metrics(): Promise<{ contentType: string; body: string }>;
  reconcile(): Promise<unknown>;
  /** The observed state for `blkexport plan` against a running agent. */
  observed(): Promise<unknown>;
}

export const DEFAULT_SOCKET = '/run/blkexport/agent.sock';

/** Why the peer of `socket` may not talk to the agent, or undefined when it may (root or our own user). */
export function refusePeer(socket: Socket): string | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return 'cannot verify peer credentials (no descriptor)';
  let uid: number;
  try {
    uid = nativeHelper().peerCredentials(fd).uid;
  } catch (e) {
    return `cannot verify peer credentials: ${describeError(e)}`;
  }
  const own = process.getuid?.() ?? 0;
  return uid === 0 || uid === own ? undefined : `uid ${uid} may not use the agent's control socket`;
}

function send(res: ServerResponse, status: number, body: unknown, contentType = 'application/json'): void {
  const text = contentType === 'application/json' ? `${JSON.stringify(body, null, 2)}\n` : String(body);
  res.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

/** Listens on `socketPath` (refusing when another agent answers there); resolves with a closer. */
export async function startControlServer(
  socketPath: string,
  h: ControlHandlers,
): Promise<{ close(): Promise<void> }> {
  await mkdir(dirname(socketPath), { recursive: true, mode: 0o755 });
  if (await socketAnswers(socketPath)) {
    throw new BlkError('AGENT', `another agent already answers on ${socketPath}`);
  }
  await unlink(socketPath).catch(() => undefined);
  const refused = new WeakMap<Socket, string>();
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const denied = refused.get(req.socket);
    if (denied !== undefined) return send(res, 403, { error: denied });
    const route = `${req.method} ${(req.url ?? '/').split('?')[0]}`;
    const fail = (e: unknown) => send(res, 500, { error: (e as Error).message });
    try {
      switch (route) {
        case 'GET /status':
          return send(res, 200, h.status());
        case 'GET /observed':
          h.observed().then((o) => send(res, 200, o), fail);
          return;
        case 'GET /metrics':
          h.metrics().then((m) => send(res, 200, m.body, m.contentType), fail);
          return;
        case 'POST /reconcile':
          h.reconcile().then((r) => send(res, 200, r), fail);
          return;
        default:
          return send(res, 404, { error: `no route ${route}` });
      }
    } catch (e) {
      fail(e);
    }
  });
  // Checked once per connection, before its first request is read.
  server.on('connection', (socket: Socket) => {
    const why = refusePeer(socket);
    if (why !== undefined) refused.set(socket, why);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    // Created 0600 from the start: no window in which others could connect.
    const old = process.umask(0o177);
    server.listen(socketPath, () => {
      process.umask(old);
      resolve();
    });
  });
  await chmod(socketPath, 0o600);
  return {
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections?.();
        unlink(socketPath).catch(() => undefined);
      }),
  };
}
