/**
 * `blkexport nbd IMAGE`: one image served over NBD in the foreground, like
 * qemu-nbd. --daemonize returns once the server listens.
 */

import { resolve } from 'node:path';
import { PROBED_FORMATS, type ProbedFormat } from '../../block/probe.js';
import {
  DEFAULT_NBD_SOCKET,
  type NbdOneShot,
  type NbdOneShotOptions,
  startNbdOneShot,
} from '../../engine/nbd-one-shot.js';
import { BlkError } from '../../errors.js';
import { formatListen, parseListen } from '../../export/nbd/listen.js';
import { parseCommandArgs } from '../args.js';
import { formatBytes } from '../format.js';
import { runOneShot } from '../one-shot-process.js';
import { parseViewOptions, VIEW_OPTIONS, VIEW_USAGE } from '../view-options.js';

export const summary = 'serve one image over NBD (like qemu-nbd)';
export const usage = `usage: blkexport nbd IMAGE [options]

Serves IMAGE (qcow2 or raw, probed) to NBD clients (qemu, qemu-img, nbdcopy,
nbdinfo, nbdfuse) until Ctrl-C or SIGTERM, then flushes and exits 0.

options:
  --listen ADDR          unix:PATH or tcp:HOST:PORT (repeatable; default unix:${DEFAULT_NBD_SOCKET})
  --name N               the export name clients ask for (default: empty, the default export)
  --description TEXT     shown to clients that list exports (nbdinfo --list)
  --writable             allow writes (a probed-raw image needs --format raw)
  --format F             auto (default), raw, qcow2, or (read-only) vpc, vdi, qed, vmdk, vhdx
${VIEW_USAGE}  --daemonize            return once the server listens
  --pidfile F            write the serving process's pid to F once serving
  --tls-cert F --tls-key F [--tls-ca F]
                         require TLS with this certificate; with a CA, clients need certificates it signed
  --tls-psk F            require TLS with pre-shared keys (identity:hexkey lines, as psktool writes)
  --insecure-tcp         allow tcp: without TLS (refused otherwise: anyone who reaches the port gets the disk)
  --allow-root DIR       image and backing files must lie inside DIR (repeatable; default: the image's directory)
`;

function parse(args: string[]): { opts: NbdOneShotOptions; daemonize: boolean; pidfile: string | undefined } {
  const { values, positionals } = parseCommandArgs('nbd', args, {
    listen: { type: 'string', multiple: true, default: [] },
    name: { type: 'string', default: '' },
    description: { type: 'string' },
    writable: { type: 'boolean', default: false },
    format: { type: 'string', default: 'auto' },
    ...VIEW_OPTIONS,
    daemonize: { type: 'boolean', default: false },
    pidfile: { type: 'string' },
    'tls-cert': { type: 'string' },
    'tls-key': { type: 'string' },
    'tls-ca': { type: 'string' },
    'tls-psk': { type: 'string' },
    'insecure-tcp': { type: 'boolean', default: false },
    'allow-root': { type: 'string', multiple: true, default: [] },
  });
  if (positionals.length !== 1) throw new BlkError('USAGE', 'expected IMAGE (see blkexport nbd --help)');
  const format = values.format as string;
  if (format !== 'auto' && !(PROBED_FORMATS as readonly string[]).includes(format)) {
    throw new BlkError('USAGE', `--format must be auto, ${PROBED_FORMATS.join(', ')}, not '${format}'`);
  }
  const listens = values.listen as string[];
  const opts: NbdOneShotOptions = {
    image: resolve(positionals[0]!),
    format: format as 'auto' | ProbedFormat,
    writable: values.writable as boolean,
    allowRoots: (values['allow-root'] as string[]).map((r) => resolve(r)),
    listen: (listens.length ? listens : [`unix:${DEFAULT_NBD_SOCKET}`]).map(parseListen),
    name: values.name as string,
    insecureTcp: values['insecure-tcp'] as boolean,
    ...parseViewOptions(values),
  };
  if (values.description !== undefined) opts.description = values.description;
  const tls = {
    cert: values['tls-cert'] && resolve(values['tls-cert']),
    key: values['tls-key'] && resolve(values['tls-key']),
    ca: values['tls-ca'] && resolve(values['tls-ca']),
    psk: values['tls-psk'] && resolve(values['tls-psk']),
  };
  if (tls.psk && (tls.cert || tls.key || tls.ca))
    throw new BlkError('USAGE', '--tls-psk excludes --tls-cert/--tls-key/--tls-ca');
  if (!tls.psk && (tls.cert || tls.key || tls.ca) && !(tls.cert && tls.key)) {
    throw new BlkError('USAGE', '--tls-cert and --tls-key go together');
  }
  if (tls.cert || tls.psk) opts.tls = tls;
  return { opts, daemonize: values.daemonize as boolean, pidfile: values.pidfile && resolve(values.pidfile) };
}

function describe(s: NbdOneShot): string {
  const o = s.opened;
  const what = o.partition
    ? `partition ${o.partition.index} (${o.partition.scheme}, offset ${o.partition.offset}) of ${o.image} (${o.format})`
    : `${o.image} (${o.format})`;
  const view = o.snapshot
    ? ` at internal snapshot ${JSON.stringify(o.snapshot.name)} (id ${o.snapshot.id})`
    : '';
  const mode =
    s.overlayDir !== undefined
      ? `writable into a throwaway overlay in ${s.overlayDir} (the image is not written)`
      : s.entry.writable
        ? 'writable'
        : 'read-only';
  const tls = s.server.tls ? `, TLS ${s.server.tls.kind}` : '';
  const where = s.addresses.map(formatListen).join(', ');
  return `serving ${what}${view} over NBD as '${s.entry.name}' on ${where}, ${formatBytes(o.node.length())}, ${mode}${tls}`;
}

export async function run(args: string[]): Promise<number> {
  const { opts, daemonize, pidfile } = parse(args);
  return runOneShot('nbd', args, {
    daemonize,
    pidfile,
    async start() {
      const s = await startNbdOneShot(opts);
      return { ready: describe(s), stop: () => s.stop() };
    },
  });
}
