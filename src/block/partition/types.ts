/**
 * What a partition table parse yields. Numbering follows Linux: MBR primaries
 * are 1–4 by slot (empty slots keep their number), logical partitions of the
 * extended partition are 5, 6, ... in EBR-chain order; GPT partitions are
 * numbered by entry slot (1-based). Sector size is 512 bytes.
 */

export const SECTOR_SIZE = 512;

export type PartitionScheme = 'mbr' | 'gpt';

/** One partition: a byte window over the disk. */
export interface Partition {
  /** Linux-style partition number (1-based). */
  index: number;
  /** Byte offset of the first sector. */
  offset: number;
  /** Length in bytes. */
  size: number;
  /** MBR: the type byte in hex as sfdisk prints it ("83"); GPT: the type GUID in upper case. */
  type: string;
  scheme: PartitionScheme;
}

/** Reads `length` bytes at `offset` of the disk (the caller's node). */
export type ReadAt = (offset: number, length: number) => Promise<Buffer>;

/** The full parse: data partitions, plus the MBR extended container's number (not a data partition). */
export interface PartitionTable {
  scheme: PartitionScheme;
  partitions: Partition[];
  extendedIndex?: number;
}
