/**
 * The vdi (VirtualBox) format driver, read-only: a 512-byte header, a block
 * map of little-endian u32 entries, and 1 MiB data blocks. An entry of
 * 0xffffffff (never written) or 0xfffffffe (discarded) reads as zeroes; any
 * other entry is the block's index in the data area. The header checks are
 * QEMU's (version 1.1, 512-byte sectors, 1 MiB blocks, no block_extra, no
 * link or parent UUID: differencing and snapshot images are refused), plus
 * the ones a hostile image needs: the block map and every mapped block lie
 * inside the file before anything is read or allocated from them.
 */
import { BlkError } from '../../errors.js';
import { defineDriver, type OpenContext } from '../driver.js';
import type { ImageInfo } from '../types.js';
import { type Piece, type PieceSource, readAt, readOnlyFormat, readOnlyFormatOps } from './pieces.js';

const SIGNATURE = 0xbeda107f;
const VERSION_1_1 = 0x00010001;
const HEADER_SIZE = 512;
const SECTOR = 512;
const BLOCK_SIZE = 1024 * 1024;
/** QEMU's limits: a block map of at most 2^30-1 entries, hence disks under 1 PiB. */
const MAX_BLOCKS = 0x3fffffff;
const TYPE_DYNAMIC = 1;
const TYPE_STATIC = 2;
/** Longest block map read (the entries that map the disk): 16 Mi entries, 64 MiB, a 16 TiB disk. */
const MAX_MAP_ENTRIES = 16 * 1024 * 1024;
/** Entries at or above this are not allocated (0xfffffffe discarded, 0xffffffff never written). */
const FIRST_UNALLOCATED = 0xfffffffe;

interface VdiState extends PieceSource {
  size: number;
  imageType: number;
  dataOffset: number;
  /** The block-map entries that map the virtual size (little-endian u32 each). */
  bmap: Buffer;
}

function uuidIsNull(b: Buffer, at: number): boolean {
  for (let i = at; i < at + 16; i++) if (b[i] !== 0) return false;
  return true;
}

async function openVdi(ctx: OpenContext): Promise<VdiState> {
  const file = ctx.file;
  if (!file) throw new BlkError('IMAGE_INVALID', `node '${ctx.nodeName}': driver vdi needs a file child`);
  const path = file.filename ?? ctx.nodeName;
  if (!ctx.readOnly) throw readOnlyFormat('vdi', path);
  const fail = (code: 'IMAGE_INVALID' | 'IMAGE_UNSUPPORTED' | 'IMAGE_CORRUPT', msg: string, field: string) =>
    new BlkError(code, msg, { file: path, field });
  const fileLength = file.length();
  if (fileLength < HEADER_SIZE)
    throw fail('IMAGE_INVALID', `file of ${fileLength} bytes has no vdi header`, 'header');
  const h = await readAt(file, 0, HEADER_SIZE);
  const signature = h.readUInt32LE(0x40);
  if (signature !== SIGNATURE)
    throw fail('IMAGE_INVALID', `bad signature 0x${signature.toString(16)}`, 'signature');
  const version = h.readUInt32LE(0x44);
  if (version !== VERSION_1_1) {
    throw fail(
      'IMAGE_UNSUPPORTED',
      `vdi version ${version >>> 16}.${version & 0xffff} (only 1.1)`,
      'version',
    );
  }
  const imageType = h.readUInt32LE(0x4c);
  if (imageType !== TYPE_DYNAMIC && imageType !== TYPE_STATIC) {
    throw fail(
      'IMAGE_UNSUPPORTED',
      `image type ${imageType} (only dynamic (1) and static (2))`,
      'image_type',
    );
  }
  const offsetBmap = h.readUInt32LE(0x154);
  const offsetData = h.readUInt32LE(0x158);
  const sectorSize = h.readUInt32LE(0x168);
  let diskSize = h.readBigUInt64LE(0x170);
  const blockSize = h.readUInt32LE(0x178);
  const blockExtra = h.readUInt32LE(0x17c);
  const blocksInImage = h.readUInt32LE(0x180);
  if (offsetBmap % SECTOR !== 0)
    throw fail('IMAGE_UNSUPPORTED', `unaligned block map offset ${offsetBmap}`, 'offset_bmap');
  if (offsetData % SECTOR !== 0)
    throw fail('IMAGE_UNSUPPORTED', `unaligned data offset ${offsetData}`, 'offset_data');
  if (sectorSize !== SECTOR)
    throw fail('IMAGE_UNSUPPORTED', `sector size ${sectorSize} (only 512)`, 'sector_size');
  if (blockSize !== BLOCK_SIZE)
    throw fail('IMAGE_UNSUPPORTED', `block size ${blockSize} (only 1 MiB)`, 'block_size');
  if (blockExtra !== 0) throw fail('IMAGE_UNSUPPORTED', `block_extra ${blockExtra} (only 0)`, 'block_extra');
  if (blocksInImage > MAX_BLOCKS)
    throw fail('IMAGE_UNSUPPORTED', `${blocksInImage} blocks (at most ${MAX_BLOCKS})`, 'blocks_in_image');
  // 'VBoxManage convertfromraw' writes odd sizes; QEMU rounds them up to whole sectors, so do we.
  diskSize = ((diskSize + 511n) / 512n) * 512n;
  if (diskSize > BigInt(blocksInImage) * BigInt(BLOCK_SIZE)) {
    throw fail('IMAGE_CORRUPT', `disk size ${diskSize} is larger than ${blocksInImage} blocks`, 'disk_size');
  }
  if (!uuidIsNull(h, 0x1a8))
    throw fail('IMAGE_UNSUPPORTED', 'a link UUID is set (differencing image)', 'uuid_link');
  if (!uuidIsNull(h, 0x1b8))
    throw fail('IMAGE_UNSUPPORTED', 'a parent UUID is set (differencing image)', 'uuid_parent');
  const size = Number(diskSize);
  const entries = Math.ceil(size / BLOCK_SIZE);
  if (offsetBmap + blocksInImage * 4 > fileLength) {
    throw fail(
      'IMAGE_CORRUPT',
      `block map (${blocksInImage} entries at ${offsetBmap}) runs past the end of the file`,
      'offset_bmap',
    );
  }
  if (entries > MAX_MAP_ENTRIES) {
    throw fail(
      'IMAGE_UNSUPPORTED',
      `a disk of ${entries} blocks (at most ${MAX_MAP_ENTRIES} are read)`,
      'disk_size',
    );
  }
  const bmap = await readAt(file, offsetBmap, entries * 4);
  for (let i = 0; i < entries; i++) {
    const e = bmap.readUInt32LE(i * 4);
    if (e >= FIRST_UNALLOCATED) continue;
    // Only the part of the last block inside the virtual size must be in the file.
    const need = Math.min(BLOCK_SIZE, size - i * BLOCK_SIZE);
    if (offsetData + e * BLOCK_SIZE + need > fileLength) {
      throw fail(
        'IMAGE_CORRUPT',
        `block map entry ${i} (block ${e}) lies past the end of the file`,
        `block_map[${i}]`,
      );
    }
  }
  if (ctx.backing) throw fail('IMAGE_INVALID', 'a vdi image has no backing node', 'backing');
  const state: VdiState = {
    file,
    path,
    backing: null,
    size,
    imageType,
    dataOffset: offsetData,
    bmap,
    locate: (offset, length) => locate(state, offset, length),
    locateCached: (offset, length) => locate(state, offset, length),
  };
  return state;
}

function locate(s: VdiState, offset: number, length: number): Piece {
  const index = Math.floor(offset / BLOCK_SIZE);
  const inBlock = offset - index * BLOCK_SIZE;
  const n = Math.min(length, BLOCK_SIZE - inBlock);
  const e = s.bmap.readUInt32LE(index * 4);
  if (e >= FIRST_UNALLOCATED) return { length: n, zero: true };
  return { host: s.dataOffset + e * BLOCK_SIZE + inBlock, length: n };
}

function info(s: VdiState): ImageInfo {
  return { format: 'vdi', virtualSize: s.size, clusterSize: BLOCK_SIZE };
}

export const vdiFormat = defineDriver<VdiState>({
  name: 'vdi',
  ...readOnlyFormatOps<VdiState>('vdi'),
  open: openVdi,
  length: (s) => s.size,
  imageInfo: info,
});
