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
import { EphemeralOverlays } from './overlays.js';

/** Where `blkexport nbd` listens when --listen is not given. */
export const DEFAULT_NBD_SOCKET = '/run/blkexport/nbd.sock';

export interface NbdOneShotOptions {
  image: string;
  format: 'auto' | ProbedFormat;
  writable: boolean;
  partition?: number;
  /** qcow2: a read-only view of this internal snapshot (id, else name). */
  snapshot?: string;
  /** A writable view whose writes go to a throwaway qcow2 overlay in `dir`; the image is opened read-only, shared. */
  overlay?: { dir: string };
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
  /** overlay: the directory the (already unlinked) overlay file was made in. */
  overlayDir: string | undefined;
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
  const overlay = o.overlay;
  // An overlay export writes into its overlay only: the image (and every node under the overlay) is read-only.
  const opened = await openOneShotImage({
    image: o.image,
    format: o.format,
    writable: o.writable && overlay === undefined,
    forceShare: overlay !== undefined,
    allowRoots: o.allowRoots,
    ...(o.partition !== undefined ? { partition: o.partition } : {}),
    ...(o.snapshot !== undefined ? { snapshot: o.snapshot } : {}),
  });
  const server = new NbdServer({ tls });
  let dropOverlay = async () => {};
  const closeImage = async () => {
    await dropOverlay().catch(() => undefined);
    await opened.close();
  };
  try {
    let node = opened.node;
    if (overlay !== undefined) {
      const overlays = new EphemeralOverlays(overlay.dir, true);
      const ov = await overlays.create(opened.graph, 'nbd', node);
      dropOverlay = () => overlays.drop(opened.graph, ov);
      node = ov.node;
    }
    const writable = o.writable || overlay !== undefined;
    const entry = server.addExport({
      name: o.name,
      description: o.description,
      node,
      writable,
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
      overlayDir: overlay?.dir,
      async stop() {
        if (stopped) return;
        stopped = true;
        try {
          await server.close();
          if (writable) await node.flush();
        } finally {
          await closeImage();
        }
      },
    };
  } catch (e) {
    await server.close().catch(() => undefined);
    await closeImage().catch(() => undefined);
    throw e;
  }
}
