/**
 * The metadata region: a 64 KiB table of items (GUID, offset, length,
 * flags), then the items. Five are required (file parameters, virtual disk
 * size, page 83 data, logical and physical sector size); a differencing
 * image also has a parent locator. An unknown item marked required makes the
 * image unreadable (as the specification says); every item must lie inside
 * the region, past the table.
 */
import { corrupt, vhdxError } from './errors.js';
import {
  BLOCK_SIZE_MAX,
  BLOCK_SIZE_MIN,
  guidText,
  ITEM_FILE_PARAMETERS,
  ITEM_LOGICAL_SECTOR,
  ITEM_PAGE83,
  ITEM_PARENT_LOCATOR,
  ITEM_PHYSICAL_SECTOR,
  ITEM_VIRTUAL_DISK_SIZE,
  LOCATOR_TYPE_VHDX,
  MAX_TABLE_ENTRIES,
  MAX_VIRTUAL_SIZE,
  METADATA_TABLE_SIZE,
} from './layout.js';

export interface VhdxMetadata {
  blockSize: number;
  leaveBlocksAllocated: boolean;
  hasParent: boolean;
  /** Virtual disk size in bytes, as recorded. */
  virtualDiskSize: number;
  logicalSectorSize: number;
  physicalSectorSize: number;
  /** The SCSI page 83 identifier, as GUID text. */
  page83: string;
  /** Parent locator key/value pairs (differencing images only). */
  parentLocator?: Map<string, string>;
}

interface Item {
  offset: number;
  length: number;
}

const KNOWN: [string, Buffer, number][] = [
  ['file_parameters', ITEM_FILE_PARAMETERS, 8],
  ['virtual_disk_size', ITEM_VIRTUAL_DISK_SIZE, 8],
  ['page83_data', ITEM_PAGE83, 16],
  ['logical_sector_size', ITEM_LOGICAL_SECTOR, 4],
  ['physical_sector_size', ITEM_PHYSICAL_SECTOR, 4],
  ['parent_locator', ITEM_PARENT_LOCATOR, 20],
];

/** The items of the metadata table, by name, each checked to lie inside the region. */
export function parseMetadataTable(table: Buffer, regionLength: number, file: string): Map<string, Item> {
  if (table.toString('latin1', 0, 8) !== 'metadata')
    throw corrupt(file, 'metadata.signature', 'bad metadata table signature');
  const count = table.readUInt16LE(10);
  if (count > MAX_TABLE_ENTRIES)
    throw corrupt(file, 'metadata.entry_count', `${count} entries (at most ${MAX_TABLE_ENTRIES})`);
  const items = new Map<string, Item>();
  for (let i = 0; i < count; i++) {
    const e = 32 + 32 * i;
    const guid = table.subarray(e, e + 16);
    const offset = table.readUInt32LE(e + 16);
    const length = table.readUInt32LE(e + 20);
    const required = (table.readUInt32LE(e + 24) & 4) !== 0;
    const known = KNOWN.find(([, g]) => g.equals(guid));
    if (!known) {
      if (required) {
        throw vhdxError(
          'IMAGE_UNSUPPORTED',
          file,
          `metadata.entry[${i}]`,
          `required metadata item ${guidText(guid)} is not supported`,
        );
      }
      continue;
    }
    const [name, , need] = known;
    const field = `metadata.${name}`;
    if (items.has(name)) throw corrupt(file, field, 'item appears twice');
    if (length < need) throw corrupt(file, field, `item is ${length} bytes long (needs ${need})`);
    if (offset < METADATA_TABLE_SIZE || offset + length > regionLength) {
      throw corrupt(
        file,
        field,
        `item [${offset}, ${offset + length}) lies outside the metadata region (${regionLength} bytes)`,
      );
    }
    items.set(name, { offset, length });
  }
  for (const [name] of KNOWN.slice(0, 5)) {
    if (!items.has(name))
      throw vhdxError('IMAGE_INVALID', file, `metadata.${name}`, 'required metadata item is missing');
  }
  return items;
}

/** Decodes the metadata items, given a reader of item bytes. */
export async function readMetadata(
  items: Map<string, Item>,
  read: (item: Item) => Promise<Buffer>,
  file: string,
): Promise<VhdxMetadata> {
  const get = (name: string) => read(items.get(name)!);
  const params = await get('file_parameters');
  const blockSize = params.readUInt32LE(0);
  const bits = params.readUInt32LE(4);
  const hasParent = (bits & 2) !== 0;
  if (blockSize < BLOCK_SIZE_MIN || blockSize > BLOCK_SIZE_MAX || (blockSize & (blockSize - 1)) !== 0) {
    throw corrupt(
      file,
      'metadata.file_parameters.block_size',
      `block size ${blockSize} is not a power of two between 1 MiB and 256 MiB`,
    );
  }
  const big = (await get('virtual_disk_size')).readBigUInt64LE(0);
  if (big > BigInt(MAX_VIRTUAL_SIZE)) {
    throw vhdxError(
      'IMAGE_TOO_LARGE',
      file,
      'metadata.virtual_disk_size',
      `virtual disk size ${big} is larger than 64 TiB`,
    );
  }
  const logical = (await get('logical_sector_size')).readUInt32LE(0);
  if (logical !== 512 && logical !== 4096) {
    throw corrupt(file, 'metadata.logical_sector_size', `logical sector size ${logical} (512 or 4096)`);
  }
  const physical = (await get('physical_sector_size')).readUInt32LE(0);
  if (physical !== 512 && physical !== 4096) {
    throw corrupt(file, 'metadata.physical_sector_size', `physical sector size ${physical} (512 or 4096)`);
  }
  const md: VhdxMetadata = {
    blockSize,
    leaveBlocksAllocated: (bits & 1) !== 0,
    hasParent,
    virtualDiskSize: Number(big),
    logicalSectorSize: logical,
    physicalSectorSize: physical,
    page83: guidText(await get('page83_data')),
  };
  if (hasParent) {
    if (!items.has('parent_locator')) {
      throw corrupt(
        file,
        'metadata.parent_locator',
        'a differencing image (has_parent) without a parent locator',
      );
    }
    md.parentLocator = parseParentLocator(await get('parent_locator'), file);
  }
  return md;
}

/** The key/value pairs of a VHDX parent locator (UTF-16LE strings at offsets inside the item). */
export function parseParentLocator(item: Buffer, file: string): Map<string, string> {
  const field = 'metadata.parent_locator';
  if (!item.subarray(0, 16).equals(LOCATOR_TYPE_VHDX)) {
    throw vhdxError(
      'IMAGE_UNSUPPORTED',
      file,
      field,
      `parent locator type ${guidText(item.subarray(0, 16))} is not the VHDX one`,
    );
  }
  const count = item.readUInt16LE(18);
  if (20 + 12 * count > item.length) throw corrupt(file, field, `${count} entries do not fit in the item`);
  const out = new Map<string, string>();
  const str = (off: number, len: number, what: string) => {
    if (len % 2 !== 0 || off + len > item.length || len === 0) {
      throw corrupt(file, field, `${what} [${off}, ${off + len}) is not a UTF-16 string inside the item`);
    }
    return item.toString('utf16le', off, off + len);
  };
  for (let i = 0; i < count; i++) {
    const e = 20 + 12 * i;
    const key = str(item.readUInt32LE(e), item.readUInt16LE(e + 8), `key ${i}`);
    const value = str(item.readUInt32LE(e + 4), item.readUInt16LE(e + 10), `value ${i}`);
    if (out.has(key)) throw corrupt(file, field, `key '${key}' appears twice`);
    out.set(key, value);
  }
  return out;
}
