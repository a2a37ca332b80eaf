/**
 * The agent's host-level NBD server: one server for every `type: nbd`
 * export of the native engine, on the addresses of `--nbd-listen` (the
 * default Unix socket when none is given). It starts when the first NBD
 * export is added, so an agent without NBD exports listens on nothing, and
 * it stays up until the agent stops. TCP without TLS is refused when the
 * agent starts, unless asked for (checkNbdHostConfig).
 */
import { readFileSync } from 'node:fs';
import { chmod, chown, mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';
import { BlkError } from '../../errors.js';
import { formatListen, type NbdListen } from '../../export/nbd/listen.js';
import { NbdServer } from '../../export/nbd/server.js';
import { loadTlsConfig } from '../../export/nbd/tls.js';
import { checkTcpPolicy, DEFAULT_NBD_SOCKET } from '../nbd-one-shot.js';

/** TLS credentials as files (x509: cert + key, with ca client certificates are required; or a PSK file). */
export interface NbdTlsFiles {
  cert?: string;
  key?: string;
  ca?: string;
  psk?: string;
}

export interface NbdHostConfig {
  /** Where to listen; empty: the default Unix socket. */
  listen: NbdListen[];
  tls?: NbdTlsFiles;
  /** Serve TCP without TLS anyway (--nbd-insecure-tcp). */
  insecureTcp: boolean;
  /** The group (name or gid) that may connect to the Unix sockets (mode 0660); absent: 0600, owner only. */
  socketGroup?: string;
}

function tlsWanted(c: NbdHostConfig): boolean {
  return c.tls !== undefined && Object.values(c.tls).some((v) => v !== undefined);
}

/** The addresses the server listens on: the given ones, or the default socket. */
export function nbdHostAddresses(c: NbdHostConfig): NbdListen[] {
  return c.listen.length > 0 ? c.listen : [{ kind: 'unix', path: DEFAULT_NBD_SOCKET }];
}

/** The gid of a group name or number, from /etc/group. */
export function groupId(group: string, groupFile = '/etc/group'): number {
  if (/^[0-9]+$/.test(group)) return Number(group);
  let text = '';
  try {
    text = readFileSync(groupFile, 'utf8');
  } catch {
    // no group file: only numeric groups resolve
  }
  for (const line of text.split('\n')) {
    const [name, , gid] = line.split(':');
    if (name === group && gid !== undefined && /^[0-9]+$/.test(gid)) return Number(gid);
  }
  throw new BlkError('USAGE', `--nbd-socket-group ${group}: no such group`);
}

/** Refuses a configuration the agent must not start with (plain TCP, half a TLS setup, an unknown group). */
export function checkNbdHostConfig(c: NbdHostConfig): void {
  checkTcpPolicy(nbdHostAddresses(c), tlsWanted(c), c.insecureTcp, '--nbd-insecure-tcp');
  const t = c.tls ?? {};
  if (t.psk !== undefined && (t.cert || t.key || t.ca))
    throw new BlkError(
      'USAGE',
      '--nbd-tls-psk and the x509 options (--nbd-tls-cert/-key/-ca) exclude each other',
    );
  if (t.psk === undefined && (t.cert || t.key || t.ca) && !(t.cert && t.key))
    throw new BlkError('USAGE', 'x509 TLS needs both --nbd-tls-cert and --nbd-tls-key');
  if (c.socketGroup !== undefined) groupId(c.socketGroup);
}

export class NbdHost {
  private started: Promise<NbdServer> | undefined;
  private live: NbdServer | undefined;

  constructor(readonly config: NbdHostConfig) {}

  /** The running server, started on first use. */
  server(): Promise<NbdServer> {
    this.started ??= this.start().catch((e) => {
      this.started = undefined; // the next NBD export tries again
      throw e;
    });
    return this.started;
  }

  private async start(): Promise<NbdServer> {
    const tls = tlsWanted(this.config) ? await loadTlsConfig(this.config.tls!) : undefined;
    const server = new NbdServer({ tls });
    const gid = this.config.socketGroup === undefined ? undefined : groupId(this.config.socketGroup);
    try {
      for (const l of nbdHostAddresses(this.config)) {
        if (l.kind === 'unix' && l.path === DEFAULT_NBD_SOCKET)
          await mkdir(dirname(l.path), { recursive: true, mode: 0o755 });
        await server.listen(l).catch((e: Error) => {
          throw new BlkError(
            'EXPORT_INVALID',
            `NBD server: cannot listen on ${formatListen(l)}: ${e.message}`,
          );
        });
        // Mode 0600 from listen(); the group is given before it may connect.
        if (l.kind === 'unix' && gid !== undefined) {
          await chown(l.path, process.getuid?.() ?? 0, gid);
          await chmod(l.path, 0o660);
        }
      }
    } catch (e) {
      await server.close().catch(() => undefined);
      throw e;
    }
    this.live = server;
    return server;
  }

  /** The bound addresses (empty until started). */
  addresses(): string[] {
    return this.live?.addresses().map(formatListen) ?? [];
  }

  /** Stops listening and ends every connection (after their requests in flight). */
  async close(): Promise<void> {
    const s = await this.started?.catch(() => undefined);
    this.started = undefined;
    this.live = undefined;
    await s?.close();
  }
}
