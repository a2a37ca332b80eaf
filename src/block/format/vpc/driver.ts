/**
 * The vpc (vhd) format driver, read-only: fixed disks (the file up to its
 * footer), dynamic disks (BAT of blocks, each a sector bitmap then data) and
 * differencing disks (a dynamic disk whose sector bitmaps say which sectors
 * it holds; the others come from its parent, found through the parent
 * locators and the backing-file path policy). footer.ts parses,
 * parent.ts finds the parent, pieces.ts reads.
 *
 * Dynamic disks are read as QEMU reads them: an allocated block is read
 * whole, its bitmap is not looked at. QEMU opens a differencing disk as a
 * dynamic one without a parent; we follow the parent, as the format means.
 */
import { BlkError } from '../../../errors.js';
import { defineDriver, type OpenContext } from '../../driver.js';
import type { ImageInfo } from '../../types.js';
import { refuseLoop } from '../backing-file.js';
import { type Piece, type PieceSource, readAt, readOnlyFormat, readOnlyFormatOps } from '../pieces.js';
import { TableCache } from '../qcow2/table-cache.js';
import {
  BAT_UNUSED,
  DYN_HEADER_SIZE,
  FOOTER_SIZE,
  parseDynHeader,
  parseFooter,
  TYPE_DIFFERENCING,
  TYPE_FIXED,
  type VpcDynHeader,
  type VpcFooter,
} from './footer.js';
import { openParent, parentNames, vpcUuids } from './parent.js';

/** Sector bitmaps of a differencing disk kept in memory (bytes). */
const BITMAP_CACHE_BYTES = 1024 * 1024;

interface VpcState extends PieceSource {
  footer: VpcFooter;
  dyn: VpcDynHeader | undefined;
  /** The BAT entries that map the virtual size (big-endian u32 each). */
  bat: Buffer;
  bitmaps: TableCache;
  parentName: string | undefined;
}

async function openVpc(ctx: OpenContext): Promise<VpcState> {
  const file = ctx.file;
  if (!file) throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver vpc needs a file child`);
  const path = file.filename ?? ctx.nodeName;
  if (!ctx.readOnly) throw readOnlyFormat('vpc', path);
  refuseLoop(ctx, file, path, 'parent_locator');
  const fileLength = file.length();
  if (fileLength < FOOTER_SIZE) {
    throw new BlkError('IMAGE_INVALID', `file of ${fileLength} bytes is too short for a vhd footer`, {
      file: path,
      field: 'footer',
    });
  }
  const head = await readAt(file, 0, FOOTER_SIZE);
  const atStart = head.toString('latin1', 0, 8) === 'conectix';
  const footer = parseFooter(
    atStart ? head : await readAt(file, fileLength - FOOTER_SIZE, FOOTER_SIZE),
    atStart,
    path,
  );
  const state: VpcState = {
    file,
    path,
    backing: null,
    footer,
    dyn: undefined,
    bat: Buffer.alloc(0),
    bitmaps: new TableCache(BITMAP_CACHE_BYTES, () => Promise.reject(new Error('unused'))),
    parentName: undefined,
    locate: (offset, length) => locate(state, offset, length),
    locateCached: (offset, length) => locateCached(state, offset, length),
  };
  if (footer.diskType === TYPE_FIXED) {
    if (footer.size > fileLength - FOOTER_SIZE) {
      throw new BlkError(
        'IMAGE_CORRUPT',
        `virtual size ${footer.size} is larger than the data in front of the footer (${fileLength - FOOTER_SIZE} bytes)`,
        { file: path, field: 'current_size' },
      );
    }
    if (ctx.backing) throw noBacking(path);
    return state;
  }
  if (
    footer.dataOffset < BigInt(FOOTER_SIZE) ||
    footer.dataOffset + BigInt(DYN_HEADER_SIZE) > BigInt(fileLength)
  ) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      `dynamic disk header offset ${footer.dataOffset} is outside the file`,
      {
        file: path,
        field: 'data_offset',
      },
    );
  }
  const dyn = parseDynHeader(
    await readAt(file, Number(footer.dataOffset), DYN_HEADER_SIZE),
    footer.size,
    path,
  );
  state.dyn = dyn;
  const entries = Math.ceil(footer.size / dyn.blockSize);
  if (dyn.tableOffset < BigInt(FOOTER_SIZE) || dyn.tableOffset + BigInt(entries * 4) > BigInt(fileLength)) {
    throw new BlkError(
      'IMAGE_CORRUPT',
      `BAT at ${dyn.tableOffset} (${entries} entries) lies outside the file`,
      {
        file: path,
        field: 'table_offset',
      },
    );
  }
  state.bat = await readAt(file, Number(dyn.tableOffset), entries * 4);
  for (let i = 0; i < entries; i++) {
    const e = state.bat.readUInt32BE(i * 4);
    if (e === BAT_UNUSED) continue;
    const end = e * 512 + dyn.bitmapSize + dyn.blockSize;
    if (e === 0 || end > fileLength) {
      throw new BlkError('IMAGE_CORRUPT', `BAT entry ${i} (sector ${e}) puts block ${i} outside the file`, {
        file: path,
        field: `bat[${i}]`,
      });
    }
  }
  if (footer.diskType === TYPE_DIFFERENCING) {
    state.bitmaps = new TableCache(Math.max(BITMAP_CACHE_BYTES, 2 * dyn.bitmapSize), (off) =>
      readAt(file, off, dyn.bitmapSize),
    );
    const names = await parentNames(file, dyn, path);
    state.parentName = names[0];
    if (ctx.backing !== undefined) state.backing = ctx.backing;
    else state.backing = await openParent(ctx, file, names, dyn.parentUuid, path);
  } else if (ctx.backing) {
    throw noBacking(path);
  }
  return state;
}

function noBacking(path: string): BlkError {
  return new BlkError('IMAGE_INVALID', 'only a differencing vhd has a parent (backing) node', {
    file: path,
    field: 'disk_type',
  });
}

/** The piece at `offset`; `bitmap` is the block's sector bitmap when the caller has it (differencing disks). */
function pieceIn(s: VpcState, offset: number, length: number, bitmap: Buffer | undefined): Piece | 'bitmap' {
  const dyn = s.dyn;
  if (dyn === undefined) return { host: offset, length };
  const bs = dyn.blockSize;
  const index = Math.floor(offset / bs);
  const inBlock = offset - index * bs;
  const n = Math.min(length, bs - inBlock);
  const e = s.bat.readUInt32BE(index * 4);
  if (e === BAT_UNUSED)
    return s.footer.diskType === TYPE_DIFFERENCING ? { length: n, backing: true } : { length: n, zero: true };
  const data = e * 512 + dyn.bitmapSize;
  if (s.footer.diskType !== TYPE_DIFFERENCING) return { host: data + inBlock, length: n };
  if (bitmap === undefined) return 'bitmap';
  // A run of sectors that are all in this disk, or all in the parent.
  const bit = (sector: number) => (bitmap[sector >> 3]! >> (7 - (sector & 7))) & 1;
  const first = Math.floor(inBlock / 512);
  const mine = bit(first);
  let end = (first + 1) * 512;
  while (end < inBlock + n && bit(end / 512) === mine) end += 512;
  const len = Math.min(end, inBlock + n) - inBlock;
  return mine ? { host: data + inBlock, length: len } : { length: len, backing: true };
}

function bitmapOffset(s: VpcState, offset: number): number {
  const index = Math.floor(offset / s.dyn!.blockSize);
  return s.bat.readUInt32BE(index * 4) * 512;
}

async function locate(s: VpcState, offset: number, length: number): Promise<Piece> {
  const p = pieceIn(s, offset, length, undefined);
  if (p !== 'bitmap') return p;
  const bitmap = await s.bitmaps.get(bitmapOffset(s, offset));
  return pieceIn(s, offset, length, bitmap) as Piece;
}

function locateCached(s: VpcState, offset: number, length: number): Piece | null {
  const p = pieceIn(s, offset, length, undefined);
  if (p !== 'bitmap') return p;
  const bitmap = s.bitmaps.peek(bitmapOffset(s, offset));
  return bitmap === undefined ? null : (pieceIn(s, offset, length, bitmap) as Piece);
}

function info(s: VpcState): ImageInfo {
  const out: ImageInfo = { format: 'vpc', virtualSize: s.footer.size };
  if (s.dyn !== undefined) out.clusterSize = s.dyn.blockSize;
  if (s.parentName !== undefined) {
    out.backingFilename = s.parentName;
    out.backingFormat = 'vpc';
  }
  return out;
}

export const vpcFormat = defineDriver<VpcState>({
  name: 'vpc',
  ...readOnlyFormatOps<VpcState>('vpc'),
  open: openVpc,
  async close(s) {
    s.bitmaps.clear();
  },
  length: (s) => s.footer.size,
  imageInfo: info,
  attach: (s, node) => {
    vpcUuids.set(node, s.footer.uuid);
  },
});
