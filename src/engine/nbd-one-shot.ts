/**
 * The one-shot NBD export behind `blkexport nbd`, like qemu-nbd: one image
 * (optionally one partition of it), one NBD server, one export, no
 * manifest. Opening goes through the same path policy, probing and locking
 * as `blkexport mount` (openOneShotImage). TCP without TLS is refused unless
 * the caller says it is wanted.
 */
import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { ProbedFormat } from '../block/probe.js';
import { BlkError } from '../errors.js';
import { formatListen, type NbdListen } from '../export/nbd/listen.js';
import { NbdServer } from '../export/nbd/server.js';
import { loadTlsConfig } from '../export/nbd/tls.js';
import type { NbdExportEntry } from '../export/nbd/types.js';
import { type OneShotImage, openOneShotImage } from './one-shot.js';

/** Where `blkexport nbd` listens when --listen is not given. */
export const DEFAULT_NBD_SOCKET = '/run/blkexport/nbd.sock';

export interface NbdOneShotOptions {
  image: string;
  format: 'auto' | ProbedFormat;
  writable: boolean;
  partition?: number;
  allowRoots: string[];
  listen: NbdListen[];
  /** The export name (default ''; an empty name is also what clients ask for by default). */
  name: string;
  description?: string;
  tls?: { cert?: string; key?: string; ca?: string; psk?: string };
  /** Serve TCP without TLS anyway. */
  insecureTcp: boolean;
}

export interface NbdOneShot {
  opened: OneShotImage;
  server: NbdServer;
  entry: NbdExportEntry;
  addresses: NbdListen[];
  stop(): Promise<void>;
}

/** Refuses plain TCP unless asked for: anyone who can reach the port could read (or write) the disk. */
export function checkTcpPolicy(
  listen: readonly NbdListen[],
  tls: boolean,
  insecureTcp: boolean,
  flag: string,
): void {
  const tcp = listen.find((l) => l.kind === 'tcp');
  if (tcp && !tls && !insecureTcp) {
    throw new BlkError(
      'USAGE',
      `refusing to serve ${formatListen(tcp)} without TLS: give TLS credentials, or ${flag} to allow plain TCP`,
    );
  }
}

/** Opens the image and serves it over NBD on every listen address. */
export async function startNbdOneShot(o: NbdOneShotOptions): Promise<NbdOneShot> {
  const wantsTls = o.tls !== undefined && Object.values(o.tls).some((v) => v !== undefined);
  checkTcpPolicy(o.listen, wantsTls, o.insecureTcp, '--insecure-tcp');
  const tls = wantsTls ? await loadTlsConfig(o.tls!) : undefined;
  const opened = await openOneShotImage({
    image: o.image,
    format: o.format,
    writable: o.writable,
    allowRoots: o.allowRoots,
    ...(o.partition !== undefined ? { partition: o.partition } : {}),
  });
  const server = new NbdServer({ tls });
  try {
    const entry = server.addExport({
      name: o.name,
      description: o.description,
      node: opened.node,
      writable: o.writable,
    });
    const addresses: NbdListen[] = [];
    for (const l of o.listen) {
      if (l.kind === 'unix' && l.path === DEFAULT_NBD_SOCKET)
        await mkdir(dirname(l.path), { recursive: true, mode: 0o755 });
      addresses.push(await server.listen(l));
    }
    let stopped = false;
    return {
      opened,
      server,
      entry,
      addresses,
      async stop() {
        if (stopped) return;
        stopped = true;
        try {
          await server.close();
          if (o.writable) await opened.node.flush();
        } finally {
          await opened.close();
        }
      },
    };
  } catch (e) {
    await server.close().catch(() => undefined);
    await opened.close().catch(() => undefined);
    throw e;
  }
}
