/**
 * The vhdx format driver (read-only). Split by concern: header.ts (file
 * identifier, header pair), log.ts and view.ts (the log, replayed into
 * memory), region.ts (region table), metadata.ts (metadata items, parent
 * locator), bat.ts (block allocation table), mapping.ts and read.ts (reads),
 * parent.ts (differencing images). See docs/block-layer.md for what is
 * covered and what is refused.
 */
import { BlkError, Errno } from '../../../errors.js';
import { defineDriver, type OpenContext } from '../../driver.js';
import type { BlockExtent, BlockNode, HostExtent, ImageInfo } from '../../types.js';
import { batBytes, checkBat, geometry } from './bat.js';
import { vhdxError } from './errors.js';
import { currentHeader, hasFileIdentifier } from './header.js';
import {
  HEADER_OFFSETS,
  HEADER_SIZE,
  METADATA_TABLE_SIZE,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
} from './layout.js';
import { replayLog } from './log.js';
import { DATA, mapGuest, PARENT, ZERO } from './mapping.js';
import { parseMetadataTable, readMetadata } from './metadata.js';
import { openParent, parentDisplayName } from './parent.js';
import { readGuest } from './read.js';
import { parseRegionTable } from './region.js';
import type { VhdxState } from './state.js';
import { FileView } from './view.js';

/** Blocks looked at by one blockStatus call (bounded work per SEEK_DATA/SEEK_HOLE step). */
const STATUS_BLOCKS = 4096;

const states = new WeakMap<BlockNode, VhdxState>();

/** The refusal of any writable use (NOT_SUPPORTED: terminal, the agent does not retry it). */
function writeRefused(path: string): BlkError {
  return new BlkError(
    'NOT_SUPPORTED',
    'vhdx images are served read-only: the native vhdx driver has no write path',
    { file: path },
    { errno: Errno.EROFS },
  );
}

async function bytesAt(node: BlockNode, off: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  const n = Math.max(0, Math.min(len, node.length() - off));
  if (n > 0) await node.read(off, b.subarray(0, n));
  return b;
}

async function openVhdx(ctx: OpenContext): Promise<VhdxState> {
  const file = ctx.file;
  if (!file) throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver vhdx needs a file child`);
  const path = file.filename ?? ctx.nodeName;
  if (!ctx.readOnly) throw writeRefused(path);
  if (file.fileKey !== undefined && ctx.chain.seen.has(file.fileKey)) {
    throw new BlkError('BACKING_CHAIN', 'parent chain loops back to an image already in the chain', {
      file: path,
      field: 'metadata.parent_locator',
    });
  }
  const fileLength = file.length();
  if (!hasFileIdentifier(await bytesAt(file, 0, 8))) {
    throw vhdxError('IMAGE_INVALID', path, 'file_identifier', "no 'vhdxfile' signature");
  }
  const header = currentHeader(
    await bytesAt(file, HEADER_OFFSETS[0], HEADER_SIZE),
    await bytesAt(file, HEADER_OFFSETS[1], HEADER_SIZE),
    path,
  );
  // Like QEMU, the log is replayed before the region table and metadata are read.
  const replayed = await replayLog(file, fileLength, header, path);
  const view = new FileView(file, fileLength, replayed?.length ?? fileLength, replayed?.overlay ?? null);
  const log = { offset: header.logOffset, length: header.logLength };
  const regions = parseRegionTable(
    [
      await view.bytes(REGION_TABLE_OFFSETS[0], REGION_TABLE_SIZE),
      await view.bytes(REGION_TABLE_OFFSETS[1], REGION_TABLE_SIZE),
    ],
    log,
    view.length,
    path,
  );
  const md = regions.metadata;
  if (md.length < METADATA_TABLE_SIZE) {
    throw vhdxError(
      'IMAGE_CORRUPT',
      path,
      'region_table',
      `metadata region of ${md.length} bytes cannot hold its table`,
    );
  }
  const items = parseMetadataTable(await view.bytes(md.offset, METADATA_TABLE_SIZE), md.length, path);
  const meta = await readMetadata(items, (it) => view.bytes(md.offset + it.offset, it.length), path);
  const geo = geometry(meta.blockSize, meta.logicalSectorSize, meta.virtualDiskSize, meta.hasParent);
  const bat = await view.bytes(regions.bat.offset, batBytes(geo, regions.bat, path));
  checkBat(geo, bat, view.length, log.length > 0 ? [log, ...regions.all] : regions.all, path);
  const s: VhdxState = {
    path,
    file,
    view,
    header,
    regions,
    meta,
    geo,
    bat,
    parent: null,
    parentName: meta.hasParent ? parentDisplayName(meta.parentLocator) : undefined,
    logEntriesReplayed: replayed?.entries ?? 0,
  };
  s.parent = await openParent(ctx, s, (n) => states.get(n));
  return s;
}

function info(s: VhdxState): ImageInfo {
  // The fields `qemu-img info` shows for vhdx (it has no format-specific part for it).
  const out: ImageInfo = {
    format: 'vhdx',
    virtualSize: s.geo.size,
    clusterSize: s.geo.blockSize,
    dirty: false,
  };
  if (s.parentName !== undefined) {
    out.backingFilename = s.parentName;
    out.backingFormat = 'vhdx';
  }
  return out;
}

async function blockStatus(s: VhdxState, offset: number, length: number): Promise<BlockExtent> {
  const bs = s.geo.blockSize;
  const span = Math.min(length, STATUS_BLOCKS * bs - (offset % bs));
  const first = mapGuest(s.geo, s.bat, offset, span)[0]!;
  if (first.kind === ZERO) return { offset, length: first.length, data: false, zero: true };
  if (first.kind === PARENT) {
    const p = s.parent;
    if (p === null || offset >= p.length()) return { offset, length: first.length, data: false, zero: true };
    const b = await p.blockStatus(offset, Math.min(first.length, p.length() - offset));
    return { offset, length: b.length, data: b.data, zero: b.zero };
  }
  return { offset, length: first.length, data: true, zero: false };
}

/** Appends host extents, merging contiguous ones; false when `more` is null. */
function append(out: HostExtent[], more: HostExtent[] | null | undefined): boolean {
  if (!more) return false;
  for (const m of more) {
    const x: HostExtent = 'fd' in m ? { length: m.length, fd: m.fd, host: m.host } : m;
    const last = out[out.length - 1];
    if (last && 'zero' in last && 'zero' in x) last.length += x.length;
    else if (last && 'fd' in last && 'fd' in x && last.fd === x.fd && last.host + last.length === x.host)
      last.length += x.length;
    else out.push({ ...x });
  }
  return true;
}

/**
 * Host extents from the BAT (always in memory): fully present blocks map to
 * the file (never writable), zero states to zeroes, absent blocks of a
 * differencing image to the parent's own mapping. Partially present blocks,
 * blocks the replayed log changed or that run past the file's end, and
 * invalid states answer null (the read path handles or reports them).
 */
function mapHostCached(s: VhdxState, offset: number, length: number): HostExtent[] | null {
  const out: HostExtent[] = [];
  let pos = offset;
  for (const p of mapGuest(s.geo, s.bat, offset, length)) {
    if (p.kind === DATA) {
      if (!s.view.plain(p.host, p.length) || !append(out, s.file.mapHostCached?.(p.host, p.length)))
        return null;
    } else if (p.kind === ZERO) {
      append(out, [{ length: p.length, zero: true }]);
    } else if (p.kind === PARENT) {
      const parent = s.parent;
      const avail = parent === null ? 0 : Math.max(0, Math.min(p.length, parent.length() - pos));
      if (avail > 0 && !append(out, parent!.mapHostCached?.(pos, avail))) return null;
      if (avail < p.length) append(out, [{ length: p.length - avail, zero: true }]);
    } else {
      return null; // PARTIAL or BAD
    }
    pos += p.length;
  }
  return out;
}

export const vhdxFormat = defineDriver<VhdxState>({
  name: 'vhdx',
  role: 'format',
  // Always read-only: a reopen to read-only is a no-op, one to read-write is refused.
  mutableOptions: ['read-only'],

  open: openVhdx,
  children: (s) => (s.parent ? [s.file, s.parent] : [s.file]),
  async reopenPrepare(s, opts) {
    if (opts.readOnly === false) throw writeRefused(s.path);
  },

  length: (s) => s.geo.size,
  read: readGuest,
  mapHostCached,
  blockStatus,
  allocatedSize: (s) => s.file.allocatedSize(),

  capabilities: () => ({ write: false, truncate: false, writeZeroes: false, discard: false }),
  isReadOnly: () => true,
  describe: (s) => ({ filename: s.file.filename, fileKey: s.file.fileKey }),
  imageInfo: info,
  attach: (s, node) => {
    states.set(node, s);
  },
});

/** The vhdx state behind a node (tests and tools); undefined for other nodes. */
export function vhdxStateOf(node: BlockNode): VhdxState | undefined {
  return states.get(node);
}
