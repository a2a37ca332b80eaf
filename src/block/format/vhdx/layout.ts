/**
 * VHDX on-disk constants (Microsoft's MS-VHDX specification, version 1.0):
 * where the fixed structures live, their signatures, the GUIDs that name
 * regions and metadata items, and the block states of BAT entries.
 */

export const KiB = 1024;
export const MiB = 1024 * 1024;

/** The header section: file identifier, two headers, two region tables, all in the first MiB. */
export const HEADER_SECTION = MiB;
export const HEADER_OFFSETS = [64 * KiB, 128 * KiB] as const;
/** Bytes of a header covered by its checksum. */
export const HEADER_SIZE = 4 * KiB;
export const REGION_TABLE_OFFSETS = [192 * KiB, 256 * KiB] as const;
/** Bytes of a region table covered by its checksum. */
export const REGION_TABLE_SIZE = 64 * KiB;
/** Bytes of the metadata table at the start of the metadata region. */
export const METADATA_TABLE_SIZE = 64 * KiB;
/** Most entries a region table or metadata table may hold. */
export const MAX_TABLE_ENTRIES = 2047;

export const BLOCK_SIZE_MIN = MiB;
export const BLOCK_SIZE_MAX = 256 * MiB;
/** Largest virtual disk the format allows (64 TiB). */
export const MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB;
/** A sector bitmap block is 1 MiB: 2^23 bits, one per logical sector of a chunk. */
export const SECTOR_BITMAP_BLOCK = MiB;
export const SECTORS_PER_BITMAP = 2 ** 23;

/** Log sectors are 4 KiB. */
export const LOG_SECTOR = 4 * KiB;

// --- payload block states (low 3 bits of a BAT entry)
export const PAYLOAD_NOT_PRESENT = 0;
export const PAYLOAD_UNDEFINED = 1;
export const PAYLOAD_ZERO = 2;
export const PAYLOAD_UNMAPPED = 3;
export const PAYLOAD_FULLY_PRESENT = 6;
export const PAYLOAD_PARTIALLY_PRESENT = 7;
// --- sector bitmap block states
export const SB_NOT_PRESENT = 0;
export const SB_PRESENT = 6;

/** The 16 on-disk bytes of a GUID written as text (first three groups little-endian, as Windows stores them). */
export function guidBytes(text: string): Buffer {
  const h = text.replace(/[{}-]/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(h)) throw new Error(`bad GUID ${text}`);
  const b = Buffer.from(h, 'hex');
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

/** The text form ("{xxxxxxxx-xxxx-...}", upper case) of 16 on-disk GUID bytes. */
export function guidText(b: Buffer): string {
  const c = Buffer.from(b.subarray(0, 16));
  c.subarray(0, 4).reverse();
  c.subarray(4, 6).reverse();
  c.subarray(6, 8).reverse();
  const h = c.toString('hex').toUpperCase();
  return `{${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}}`;
}

export const BAT_REGION = guidBytes('2DC27766-F623-4200-9D64-115E9BFD4A08');
export const METADATA_REGION = guidBytes('8B7CA206-4790-4B9A-B8FE-575F050F886E');

export const ITEM_FILE_PARAMETERS = guidBytes('CAA16737-FA36-4D43-B3B6-33F0AA44E76B');
export const ITEM_VIRTUAL_DISK_SIZE = guidBytes('2FA54224-CD1B-4876-B211-5DBED83BF4B8');
export const ITEM_PAGE83 = guidBytes('BECA12AB-B2E6-4523-93EF-C309E000C746');
export const ITEM_LOGICAL_SECTOR = guidBytes('8141BF1D-A96F-4709-BA47-F233A8FAAB5F');
export const ITEM_PHYSICAL_SECTOR = guidBytes('CDA348C7-445D-4471-9CC9-E9885251C556');
export const ITEM_PARENT_LOCATOR = guidBytes('A8D35F2D-B30B-454D-ABF7-D3D84834AB0C');
/** The parent locator type of a VHDX parent. */
export const LOCATOR_TYPE_VHDX = guidBytes('B04AEFB7-D19E-4A81-B789-25B8E9445913');
