/**
 * `blkexport info IMAGE [-o json]`: format, sizes, features, backing file and
 * snapshots of an image, read by our own block layer. The JSON uses the
 * names of `qemu-img info --output=json`. Like qemu-img, the backing file is
 * not opened unless --backing-chain asks for it.
 */
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { openImage } from '../../block/open-image.js';
import { PROBED_FORMATS, type ProbedFormat } from '../../block/probe.js';
import type { BlockNode } from '../../block/types.js';
import { BlkError } from '../../errors.js';
import { parseCommandArgs } from '../args.js';
import { formatBytes } from '../format.js';

export const summary = 'format, virtual size, cluster size, backing chain, features, snapshots';
export const usage = `usage: blkexport info IMAGE [-o human|json] [--format auto|raw|qcow2|vpc|vdi|qed|vmdk|vhdx] [--backing-chain]
        [--allow-root DIR]... [-U]

Shows what blkexport sees in IMAGE. JSON field names follow
\`qemu-img info --output=json\`.

options:
  -o, --output FMT     human (default) or json
  --format F           auto (default: probe), raw, qcow2, vpc, vdi, qed, vmdk or vhdx (a fixed vhd probes as raw)
  --backing-chain      also describe every backing file (followed only inside the allowed roots)
  --allow-root DIR     where backing files may be followed from (default: the image's directory)
  -U, --force-share    take no image locks (as qemu-img -U): works while QEMU writes the image
`;

/** One image's description with qemu-img's JSON names. */
export type InfoJson = Record<string, unknown>;

function describeNode(node: BlockNode, format: string, filename: string, actualSize: number): InfoJson {
  const i = node.imageInfo?.();
  const out: InfoJson = {
    'virtual-size': node.length(),
    filename,
    format,
    'actual-size': actualSize,
  };
  if (i?.clusterSize !== undefined) out['cluster-size'] = i.clusterSize;
  if (i?.backingFilename !== undefined) {
    out['backing-filename'] = i.backingFilename;
    out['full-backing-filename'] = isAbsolute(i.backingFilename)
      ? i.backingFilename
      : join(dirname(filename), i.backingFilename);
    if (i.backingFormat !== undefined) out['backing-filename-format'] = i.backingFormat;
  }
  if (i?.snapshots && i.snapshots.length > 0) {
    out.snapshots = i.snapshots.map((s) => ({
      icount: s.icount,
      'vm-clock-nsec': s.vmClockNsec % 1e9,
      name: s.name,
      'date-sec': s.dateSec,
      'date-nsec': s.dateNsec,
      'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
      id: s.id,
      'vm-state-size': s.vmStateSize,
    }));
  }
  if (i?.formatSpecific) out['format-specific'] = i.formatSpecific;
  out['dirty-flag'] = i?.dirty ?? false;
  return out;
}

/** Describes the image at `filename` (and its backing chain when asked) in qemu-img's JSON shape. */
export async function imageInfoJson(
  filename: string,
  opts: {
    format?: 'auto' | ProbedFormat;
    backingChain?: boolean;
    allowedRoots?: string[];
    /** Take no image locks (qemu-img -U). */
    forceShare?: boolean;
  } = {},
): Promise<InfoJson[]> {
  const img = await openImage({
    filename: resolve(filename),
    format: opts.format ?? 'auto',
    readOnly: true,
    backing: opts.backingChain ? 'follow' : 'none',
    allowedRoots: opts.allowedRoots,
    ...(opts.forceShare ? { locking: 'off' as const } : {}),
  });
  try {
    const out: InfoJson[] = [];
    let node: BlockNode | undefined = img.node;
    // Like qemu-img: the name as given, and backing names joined to its directory.
    let name = filename;
    let format = img.format;
    while (node) {
      const file = node.children[0];
      // vmdk: every extent file counts, as in qemu-img (its node sums them).
      const actual = file && node.driver !== 'vmdk' ? await file.allocatedSize() : await node.allocatedSize();
      const d = describeNode(node, format, name, actual);
      out.push(d);
      if (!opts.backingChain) break;
      const backing: BlockNode | undefined = node.driver !== 'raw' ? node.children[1] : undefined;
      // children are [file, backing?, data file?]; a data file is a protocol node, a backing never is.
      if (!backing || backing.role === 'protocol') break;
      name = (d['full-backing-filename'] as string) ?? backing.filename ?? '?';
      format = backing.driver;
      node = backing;
    }
    return out;
  } finally {
    await img.close();
  }
}

function humanBytes(n: number): string {
  return formatBytes(n).replace(/ \(\d+ bytes\)$/, '');
}

function renderValue(v: unknown): string {
  return Array.isArray(v) ? (v.length ? JSON.stringify(v) : '[]') : String(v);
}

/** qemu-img-like text for one image. */
export function renderInfo(d: InfoJson): string {
  const lines = [
    `image: ${d.filename}`,
    `file format: ${d.format}`,
    `virtual size: ${formatBytes(d['virtual-size'] as number)}`,
    `disk size: ${humanBytes(d['actual-size'] as number)}`,
  ];
  if (d['cluster-size'] !== undefined) lines.push(`cluster_size: ${d['cluster-size']}`);
  if (d['backing-filename'] !== undefined) {
    let b = `backing file: ${d['backing-filename']}`;
    if (d['full-backing-filename'] !== d['backing-filename'])
      b += ` (actual path: ${d['full-backing-filename']})`;
    lines.push(b);
    if (d['backing-filename-format'] !== undefined)
      lines.push(`backing file format: ${d['backing-filename-format']}`);
  }
  const snaps = d.snapshots as Record<string, number | string>[] | undefined;
  if (snaps?.length) {
    lines.push('Snapshot list:');
    lines.push('ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT');
    for (const s of snaps) {
      const date = new Date((s['date-sec'] as number) * 1000).toISOString().replace('T', ' ').slice(0, 19);
      const clock = s['vm-clock-sec'] as number;
      const hms = `${String(Math.floor(clock / 3600)).padStart(4, '0')}:${String(Math.floor(clock / 60) % 60).padStart(2, '0')}:${String(clock % 60).padStart(2, '0')}.${String(Math.floor((s['vm-clock-nsec'] as number) / 1e6)).padStart(3, '0')}`;
      lines.push(
        `${String(s.id).padEnd(9)} ${String(s.name).padEnd(17)} ${humanBytes(s['vm-state-size'] as number).padStart(7)} ${date} ${hms} ${s.icount ?? '--'}`,
      );
    }
  }
  lines.push(`dirty flag: ${d['dirty-flag']}`);
  const fs = d['format-specific'] as { type: string; data: Record<string, unknown> } | undefined;
  if (fs) {
    lines.push('Format specific information:');
    for (const [k, v] of Object.entries(fs.data)) lines.push(`    ${k}: ${renderValue(v)}`);
  }
  return lines.join('\n');
}

/** Runs `blkexport info`. */
export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommandArgs('info', args, {
    output: { type: 'string', short: 'o', default: 'human' },
    format: { type: 'string', default: 'auto' },
    'backing-chain': { type: 'boolean', default: false },
    'allow-root': { type: 'string', multiple: true },
    'force-share': { type: 'boolean', short: 'U', default: false },
  });
  if (positionals.length !== 1)
    throw new BlkError('USAGE', 'info needs exactly one IMAGE (see blkexport info --help)');
  const output = values.output;
  if (output !== 'human' && output !== 'json')
    throw new BlkError('USAGE', `unknown output format '${output}'`);
  const format = values.format;
  if (format !== 'auto' && !(PROBED_FORMATS as readonly string[]).includes(format)) {
    throw new BlkError('USAGE', `unknown format '${format}' (auto, ${PROBED_FORMATS.join(', ')})`);
  }
  const infos = await imageInfoJson(positionals[0]!, {
    format: format as 'auto' | ProbedFormat,
    backingChain: values['backing-chain'],
    allowedRoots: values['allow-root'],
    forceShare: values['force-share'],
  });
  if (output === 'json') {
    console.log(JSON.stringify(values['backing-chain'] ? infos : infos[0], null, 4));
  } else {
    console.log(infos.map(renderInfo).join('\n\n'));
  }
  return 0;
}
