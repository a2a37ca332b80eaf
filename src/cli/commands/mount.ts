/**
 * `blkexport mount IMAGE [MOUNTPOINT]`: one export in the foreground, no
 * manifest (the seed's qemu-fuse-disk-export.py use case). --daemonize
 * returns only once the export is mounted and readable from another process.
 */
import { resolve } from 'node:path';
import { PROBED_FORMATS, type ProbedFormat } from '../../block/probe.js';
import { type OneShot, type OneShotOptions, startOneShot } from '../../engine/one-shot.js';
import { BlkError, describeError } from '../../errors.js';
import { parseCommandArgs } from '../args.js';
import { formatBytes } from '../format.js';
import { runOneShot } from '../one-shot-process.js';
import { parseViewOptions, VIEW_OPTIONS, VIEW_USAGE } from '../view-options.js';

export const summary = 'export one image as a raw file (default: over the image itself)';
export const usage = `usage: blkexport mount IMAGE [MOUNTPOINT] [options]

Presents IMAGE (qcow2, raw, or read-only vpc, vdi, qed, vmdk, vhdx; probed) as a raw image file at MOUNTPOINT, which
defaults to IMAGE itself: until unmounted, \`file\`, \`parted\`, \`kpartx\`,
\`mount -o loop\` see the guest disk. Serves in the foreground until Ctrl-C or
SIGTERM, then flushes, unmounts and exits 0.

options:
  --format F             auto (default), raw, qcow2, or (read-only) vpc, vdi, qed, vmdk, vhdx
  --writable             allow writes (a probed-raw image needs --format raw)
  --growable             writes past the end grow the image; allows truncate
  --allow-other          let other users open the export (default: try, fall back)
${VIEW_USAGE}  --daemonize            return once the export is mounted and readable
  --pidfile F            write the serving process's pid to F once exported
  --create-mountpoint    create MOUNTPOINT as an empty file if missing (removed at unmount)
  --allow-root DIR       the image and the backing/data files it names must lie inside DIR
                         (repeatable; default: the image's directory). MOUNTPOINT, typed by you,
                         is not confined
`;

function parse(args: string[]): { opts: OneShotOptions; daemonize: boolean; pidfile: string | undefined } {
  const { values, positionals } = parseCommandArgs('mount', args, {
    format: { type: 'string', default: 'auto' },
    writable: { type: 'boolean', default: false },
    growable: { type: 'boolean', default: false },
    'allow-other': { type: 'boolean' },
    ...VIEW_OPTIONS,
    daemonize: { type: 'boolean', default: false },
    pidfile: { type: 'string' },
    'create-mountpoint': { type: 'boolean', default: false },
    'allow-root': { type: 'string', multiple: true, default: [] },
  });
  if (positionals.length < 1 || positionals.length > 2) {
    throw new BlkError('USAGE', 'expected IMAGE [MOUNTPOINT] (see blkexport mount --help)');
  }
  const format = values.format as string;
  if (format !== 'auto' && !(PROBED_FORMATS as readonly string[]).includes(format)) {
    throw new BlkError('USAGE', `--format must be auto, ${PROBED_FORMATS.join(', ')}, not '${format}'`);
  }
  const view = parseViewOptions(values);
  if (values.overlay && values.growable)
    throw new BlkError(
      'USAGE',
      "--overlay keeps the image's size (the overlay is a qcow2 image of that size): no --growable",
    );
  if (values.growable && !values.writable) throw new BlkError('USAGE', '--growable needs --writable');
  const opts: OneShotOptions = {
    image: resolve(positionals[0]!),
    format: format as 'auto' | ProbedFormat,
    writable: values.writable as boolean,
    growable: values.growable as boolean,
    allowOther: values['allow-other'] === undefined ? 'auto' : values['allow-other'] ? 'on' : 'off',
    createMountpoint: values['create-mountpoint'] as boolean,
    allowRoots: (values['allow-root'] as string[]).map((r) => resolve(r)),
    ...view,
  };
  if (positionals[1] !== undefined) opts.mountpoint = resolve(positionals[1]);
  return { opts, daemonize: values.daemonize as boolean, pidfile: values.pidfile && resolve(values.pidfile) };
}

function describe(s: OneShot): string {
  const what = s.partition
    ? `partition ${s.partition.index} (${s.partition.scheme}, offset ${s.partition.offset}) of ${s.image} (${s.format})`
    : `${s.image} (${s.format})`;
  const view = s.snapshot
    ? ` at internal snapshot ${JSON.stringify(s.snapshot.name)} (id ${s.snapshot.id})`
    : '';
  const mode =
    s.overlayDir !== undefined
      ? `writable into a throwaway overlay in ${s.overlayDir} (the image is not written)`
      : s.export.isWritable
        ? s.export.isGrowable
          ? 'writable, growable'
          : 'writable'
        : 'read-only';
  // The one line about passthrough; said only where a raw export could have it.
  const pt = s.export.passthrough;
  const how = pt.active
    ? ' (FUSE passthrough)'
    : pt.why === 'node'
      ? ''
      : ` (no FUSE passthrough: ${pt.reason})`;
  return `exported ${what}${view} on ${s.mountpoint} as raw, ${formatBytes(s.size)}, ${mode}${how}`;
}

export async function run(args: string[]): Promise<number> {
  const { opts, daemonize, pidfile } = parse(args);
  return runOneShot('mount', args, {
    daemonize,
    pidfile,
    async start() {
      const session = await startOneShot(opts);
      session.export.onError = (op, err) =>
        console.error(`blkexport mount: ${op} failed: ${describeError(err)}`);
      return { ready: describe(session), stop: () => session.stop() };
    },
  });
}
