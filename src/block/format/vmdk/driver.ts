/**
 * The vmdk format driver, read-only. Split by concern: descriptor.ts parses
 * the text descriptor, sparse-header.ts the KDMV header and stream footer,
 * grains.ts the grain directory and tables, stream.ts compressed grains,
 * extents.ts opens the extents a descriptor names (through the path
 * policy), read.ts reads and maps. The parent (`parentFileNameHint`) is
 * opened like a qcow2 backing file, always as vmdk; as in QEMU, reads that
 * reach it are refused when its CID is not this image's parentCID.
 */
import { BlkError } from '../../../errors.js';
import { defineDriver, type OpenContext } from '../../driver.js';
import type { BlockNode, ImageInfo } from '../../types.js';
import { openNamedBacking, refuseLoop } from '../backing-file.js';
import { type Descriptor, descriptorText, MAX_DESCRIPTOR_BYTES, parseDescriptor } from './descriptor.js';
import {
  checkCreateType,
  type Extent,
  openDescriptorExtents,
  readSparseHeader,
  sparseExtent,
} from './extents.js';
import { blockStatus, mapHostCached, readGuest, type VmdkReadState } from './read.js';
import { SECTOR } from './sparse-header.js';

/** Where QEMU reads the CIDs and parent name of a sparse file (sector 1), and how much. */
const EMBEDDED_DESCRIPTOR_OFFSET = 0x200;
const EMBEDDED_DESCRIPTOR_BYTES = 20 * SECTOR;

export interface VmdkState extends VmdkReadState {
  file: BlockNode;
  descriptor: Descriptor;
  createType: string;
  cid: number;
  parentCid: number;
  /** Extent files other than the image file itself (children after file and backing). */
  extentFiles: BlockNode[];
}

async function readText(node: BlockNode, offset: number, max: number): Promise<string> {
  const n = Math.max(0, Math.min(max, node.length() - offset));
  const b = Buffer.allocUnsafe(n);
  if (n > 0) await node.read(offset, b);
  return descriptorText(b);
}

/** The extents and descriptor of the image in `file`. */
async function openLayout(
  ctx: OpenContext,
  file: BlockNode,
  path: string,
): Promise<{ extents: Extent[]; descriptor: Descriptor; createType: string }> {
  const head = Buffer.alloc(Math.min(4, file.length()));
  await file.read(0, head);
  const magic = head.length === 4 ? head.toString('latin1') : '';
  if (magic !== 'KDMV' && magic !== 'COWD') {
    // A descriptor file: the whole file (up to 1 MiB) is the descriptor.
    if (file.length() < 4) {
      throw new BlkError('IMAGE_INVALID', 'the file is too small to be a vmdk image', {
        file: path,
        field: 'magic',
      });
    }
    const descriptor = parseDescriptor(await readText(file, 0, MAX_DESCRIPTOR_BYTES), path);
    const createType = checkCreateType(descriptor, path);
    return { extents: await openDescriptorExtents(ctx, descriptor, path), descriptor, createType };
  }
  const opened = await readSparseHeader(file, path);
  if (opened.kind === 'descriptor') {
    // A KDMV header of capacity 0 that carries a descriptor naming other extents.
    const descriptor = parseDescriptor(await readText(file, opened.descOffset, MAX_DESCRIPTOR_BYTES), path);
    const createType = checkCreateType(descriptor, path);
    return { extents: await openDescriptorExtents(ctx, descriptor, path), descriptor, createType };
  }
  const h = opened.header;
  const extent = await sparseExtent(file, h, path, { start: 0, type: '', filename: path });
  // Like QEMU, the CIDs and the parent come from sector 1; the extent is the header's, not the descriptor's.
  const text = await readText(file, EMBEDDED_DESCRIPTOR_OFFSET, EMBEDDED_DESCRIPTOR_BYTES);
  const descriptor = parseDescriptor(text, path, true);
  return {
    extents: [extent],
    descriptor,
    createType: h.compressed ? 'streamOptimized' : 'monolithicSparse',
  };
}

function cidOf(d: Descriptor, key: 'CID' | 'parentCID', path: string): number {
  const v = key === 'CID' ? d.cid : d.parentCid;
  if (v === undefined) {
    throw new BlkError('IMAGE_INVALID', `the descriptor has no ${key}`, { file: path, field: key });
  }
  return v;
}

/** Why reads may not reach `backing` (QEMU's vmdk_is_cid_valid), or undefined. */
function parentRefusal(backing: BlockNode | null, parentCid: number): string | undefined {
  if (backing === null) return undefined;
  if (backing.driver !== 'vmdk')
    return `the parent is a ${backing.driver} image, which has no CID to match parentCID`;
  const data = backing.imageInfo?.().formatSpecific?.data;
  const cid = data?.cid;
  if (cid !== parentCid) {
    return `parentCID ${parentCid.toString(16).padStart(8, '0')} does not match the parent's CID ${typeof cid === 'number' ? cid.toString(16).padStart(8, '0') : '(none)'}`;
  }
  return undefined;
}

async function openVmdk(ctx: OpenContext): Promise<VmdkState> {
  const file = ctx.file;
  if (!file) throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver vmdk needs a file child`);
  const path = file.filename ?? ctx.nodeName;
  if (!ctx.readOnly) {
    throw new BlkError(
      'READ_ONLY',
      'vmdk images are read-only in blkexport (open it read-only, or convert it to qcow2 to write)',
      { file: path },
    );
  }
  refuseLoop(ctx, file, path, 'parentFileNameHint');
  const { extents, descriptor, createType } = await openLayout(ctx, file, path);
  const cid = cidOf(descriptor, 'CID', path);
  const parentCid = cidOf(descriptor, 'parentCID', path);
  let backing: BlockNode | null = null;
  if (ctx.backing !== undefined) backing = ctx.backing;
  else if (descriptor.parentFileNameHint !== undefined) {
    backing = await openNamedBacking(ctx, file, descriptor.parentFileNameHint, 'vmdk', 'parentFileNameHint');
  }
  const size = extents.reduce((a, x) => a + x.length, 0);
  const extentFiles: BlockNode[] = [];
  for (const x of extents) {
    const n = x.kind === 'flat' ? x.node : x.kind === 'sparse' ? x.sparse.node : undefined;
    if (n && n !== file && !extentFiles.includes(n)) extentFiles.push(n);
  }
  return {
    path,
    size,
    extents,
    backing,
    parentRefused: parentRefusal(backing, parentCid),
    file,
    descriptor,
    createType,
    cid,
    parentCid,
    extentFiles,
  };
}

function extentInfo(x: Extent): Record<string, unknown> {
  const out: Record<string, unknown> = { 'virtual-size': x.length, filename: x.filename, format: x.type };
  if (x.kind === 'sparse') {
    out['cluster-size'] = x.sparse.grainBytes;
    if (x.sparse.header.compressed) out.compressed = true;
  }
  return out;
}

/** QEMU's top-level cluster size: when every extent is of the first one's kind and that is not flat. */
function clusterSize(s: VmdkState): number | undefined {
  const [first, ...rest] = s.extents;
  if (first === undefined || first.kind !== 'sparse') return undefined;
  const same = rest.every(
    (x) =>
      x.kind === 'sparse' &&
      x.sparse.grainBytes === first.sparse.grainBytes &&
      x.sparse.header.compressed === first.sparse.header.compressed,
  );
  return same ? first.sparse.grainBytes : undefined;
}

function info(s: VmdkState): ImageInfo {
  return {
    format: 'vmdk',
    virtualSize: s.size,
    clusterSize: clusterSize(s),
    dirty: false,
    backingFilename: s.descriptor.parentFileNameHint,
    backingFormat: s.descriptor.parentFileNameHint !== undefined ? 'vmdk' : undefined,
    formatSpecific: {
      type: 'vmdk',
      data: {
        cid: s.cid,
        'parent-cid': s.parentCid,
        'create-type': s.createType,
        extents: s.extents.map(extentInfo),
      },
    },
  };
}

export const vmdkFormat = defineDriver<VmdkState>({
  name: 'vmdk',
  role: 'format',
  mutableOptions: ['read-only'],

  open: openVmdk,
  async close(s) {
    for (const x of s.extents) {
      if (x.kind !== 'sparse') continue;
      x.sparse.tables.clear();
      x.inflated?.clear();
    }
  },
  async reopenPrepare(s, opts) {
    if (opts.readOnly === false) {
      throw new BlkError('READ_ONLY', 'vmdk images are read-only in blkexport', { file: s.path });
    }
  },
  children: (s) => [s.file, ...(s.backing ? [s.backing] : []), ...s.extentFiles],

  length: (s) => s.size,
  read: readGuest,
  mapHostCached,
  blockStatus,
  async allocatedSize(s) {
    let total = await s.file.allocatedSize();
    for (const f of s.extentFiles) total += await f.allocatedSize();
    return total;
  },
  capabilities: () => ({ write: false, truncate: false, writeZeroes: false, discard: false }),
  isReadOnly: () => true,
  describe: (s) => ({ filename: s.file.filename, fileKey: s.file.fileKey }),
  imageInfo: info,
});
