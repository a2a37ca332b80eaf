/**
 * TLS for NBD_OPT_STARTTLS, with node:tls: x509 (a certificate and key,
 * and with a CA, client certificates required) or PSK (keys in the
 * `identity:hexkey` files qemu and nbdkit read, as psktool writes them).
 * TLS 1.2 at least, as the protocol asks.
 */
import { readFile } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { createSecureContext, type SecureContext, TLSSocket } from 'node:tls';
import { BlkError } from '../../errors.js';

export type NbdTlsConfig =
  | { kind: 'x509'; context: SecureContext; requireClientCert: boolean }
  | { kind: 'psk'; keys: ReadonlyMap<string, Buffer> };

/** Parses a PSK file: one `identity:hexkey` per line; blank lines are skipped. */
export function parsePskFile(text: string, file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '') return;
    const colon = line.lastIndexOf(':');
    const id = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (colon <= 0 || !/^(?:[0-9a-fA-F]{2})+$/.test(hex)) {
      throw new BlkError('USAGE', `${file}:${i + 1}: expected identity:hexkey`);
    }
    keys.set(id, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new BlkError('USAGE', `${file}: no identity:hexkey line`);
  return keys;
}

/** Reads the files of an x509 or PSK configuration. */
export async function loadTlsConfig(o: {
  cert?: string;
  key?: string;
  ca?: string;
  psk?: string;
}): Promise<NbdTlsConfig> {
  const read = (f: string) =>
    readFile(f).catch((e: Error) => {
      throw new BlkError('USAGE', `cannot read '${f}': ${e.message}`);
    });
  if (o.psk !== undefined) {
    if (o.cert || o.key || o.ca) throw new BlkError('USAGE', 'PSK and x509 TLS options exclude each other');
    return { kind: 'psk', keys: parsePskFile((await read(o.psk)).toString('utf8'), o.psk) };
  }
  if (!o.cert || !o.key) throw new BlkError('USAGE', 'x509 TLS needs both a certificate and a key');
  try {
    const context = createSecureContext({
      cert: await read(o.cert),
      key: await read(o.key),
      ...(o.ca ? { ca: await read(o.ca) } : {}),
      minVersion: 'TLSv1.2',
    });
    return { kind: 'x509', context, requireClientCert: o.ca !== undefined };
  } catch (e) {
    if (e instanceof BlkError) throw e;
    throw new BlkError('USAGE', `TLS certificate or key refused: ${(e as Error).message}`);
  }
}

let pskCtx: SecureContext | undefined;

/** One secure context for every PSK connection (the keys are looked up per handshake). */
function pskContext(): SecureContext {
  pskCtx ??= createSecureContext({
    minVersion: 'TLSv1.2',
    maxVersion: 'TLSv1.2',
    ciphers: 'PSK',
    dhparam: 'auto',
  });
  return pskCtx;
}

/** The TLS server side over an accepted socket; resolves once the handshake succeeded. */
export function startServerTls(socket: Socket, cfg: NbdTlsConfig): Promise<TLSSocket> {
  const tls =
    cfg.kind === 'x509'
      ? new TLSSocket(socket, {
          isServer: true,
          secureContext: cfg.context,
          requestCert: cfg.requireClientCert,
          rejectUnauthorized: cfg.requireClientCert,
        })
      : new TLSSocket(socket, {
          isServer: true,
          // A given secureContext wins over per-socket options: the PSK cipher suites go in it.
          // Node offers TLS-PSK with TLS 1.2 suites (ECDHE-PSK, DHE-PSK, PSK), none in the default list.
          secureContext: pskContext(),
          pskCallback: (_s: TLSSocket, identity: string) => cfg.keys.get(identity) ?? null,
        } as ConstructorParameters<typeof TLSSocket>[1]);
  return new Promise((resolve, reject) => {
    const fail = (e: Error) => {
      tls.destroy();
      reject(e);
    };
    tls.once('secure', () => {
      tls.off('error', fail);
      resolve(tls);
    });
    tls.once('error', fail);
    tls.once('close', () => reject(new Error('connection closed during the TLS handshake')));
  });
}
