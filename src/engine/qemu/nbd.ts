/**
 * `type: nbd` exports on the qemu engine: QSD's own NBD server
 * (`nbd-server-start`) on the agent's `--nbd-listen` address, and
 * `block-export-add type=nbd` per export. QSD 7.2 runs one NBD server with
 * one address, so the agent's addresses map only when there is exactly one;
 * TLS credentials become a `tls-creds-psk` / `tls-creds-x509` object over a
 * directory of links named as QEMU expects.
 */
import { mkdir, rm, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { BlkError } from '../../errors.js';
import { formatListen, type NbdListen } from '../../export/nbd/listen.js';
import { socketAnswers } from '../../export/nbd/server.js';
import type { NbdExportConfig } from '../../manifest/types.js';
import { type NbdHostConfig, nbdHostAddresses } from '../native/nbd-host.js';
import type { QmpClient } from './qmp.js';

/** The id of the TLS credentials object the agent adds to QSD. */
export const QSD_NBD_TLS_ID = 'blkexport-nbd-tls';

/** block-export-add arguments of an NBD export. */
export function nbdExportArgs(e: NbdExportConfig): Record<string, unknown> {
  return {
    type: 'nbd',
    id: e.id,
    'node-name': e['node-name'],
    name: e.name,
    ...(e.description !== undefined ? { description: e.description } : {}),
    writable: e.writable,
  };
}

/** The one address QSD can listen on, as QMP's SocketAddressLegacy; refuses more than one. */
export function qsdNbdAddress(c: NbdHostConfig): { listen: NbdListen; addr: Record<string, unknown> } {
  const all = nbdHostAddresses(c);
  if (all.length !== 1)
    throw new BlkError(
      'NOT_SUPPORTED',
      `the qemu engine serves NBD on one address (qemu-storage-daemon runs one NBD server), and the agent has ${all.length}: ${all.map(formatListen).join(', ')}; give one --nbd-listen, or serve these exports with the native engine`,
    );
  const l = all[0]!;
  const addr =
    l.kind === 'unix'
      ? { type: 'unix', data: { path: l.path } }
      : { type: 'inet', data: { host: l.host, port: String(l.port) } };
  return { listen: l, addr };
}

/** Adds the TLS credentials object QSD's NBD server uses; returns its id, or undefined without TLS. */
async function addTlsCreds(client: QmpClient, c: NbdHostConfig, dir: string): Promise<string | undefined> {
  const t = c.tls ?? {};
  if (!t.psk && !t.cert) return undefined;
  const links = join(dir, 'nbd-tls');
  await rm(links, { recursive: true, force: true });
  await mkdir(links, { mode: 0o700 });
  let args: Record<string, unknown>;
  if (t.psk) {
    await symlink(t.psk, join(links, 'keys.psk'));
    args = { 'qom-type': 'tls-creds-psk', id: QSD_NBD_TLS_ID, dir: links, endpoint: 'server' };
  } else {
    // QEMU loads ca-cert.pem for a server too; our x509 without a CA means "no client certificates".
    if (!t.ca)
      throw new BlkError(
        'NOT_SUPPORTED',
        'the qemu engine serves NBD over x509 TLS only with --nbd-tls-ca (qemu-storage-daemon always loads a CA certificate)',
      );
    await symlink(t.cert!, join(links, 'server-cert.pem'));
    await symlink(t.key!, join(links, 'server-key.pem'));
    await symlink(t.ca, join(links, 'ca-cert.pem'));
    args = {
      'qom-type': 'tls-creds-x509',
      id: QSD_NBD_TLS_ID,
      dir: links,
      endpoint: 'server',
      'verify-peer': true,
    };
  }
  try {
    await client.execute('object-add', args);
  } catch (e) {
    if (!/already|duplicate/i.test((e as Error).message)) throw e;
  }
  return QSD_NBD_TLS_ID;
}

/**
 * Starts QSD's NBD server; returns the address it listens on. A Unix socket
 * another server answers on (the native engine's) is refused: QEMU would
 * unlink it and take the path over. A daemon whose server runs already (the
 * state lost) answers "already running", which counts as started.
 */
export async function startQsdNbdServer(client: QmpClient, c: NbdHostConfig, dir: string): Promise<string> {
  const { listen, addr } = qsdNbdAddress(c);
  if (listen.kind === 'unix' && (await socketAnswers(listen.path)))
    throw new BlkError(
      'EXPORT_EXISTS',
      `the qemu engine's NBD server cannot listen on ${formatListen(listen)}: another server answers there (the native engine's NBD exports and the qemu engine's cannot share an address)`,
    );
  const tls = await addTlsCreds(client, c, dir);
  try {
    await client.execute('nbd-server-start', { addr, ...(tls ? { 'tls-creds': tls } : {}) });
  } catch (e) {
    if (!/already running/i.test((e as Error).message)) throw e;
  }
  return formatListen(listen);
}
