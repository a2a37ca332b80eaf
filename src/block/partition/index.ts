/** Partition tables (MBR, GPT) parsed from untrusted bytes; the stable import path for callers. */
export { findPartition, listPartitions, nodeReader, readTable } from './table.js';
export {
  type Partition,
  type PartitionScheme,
  type PartitionTable,
  type ReadAt,
  SECTOR_SIZE,
} from './types.js';
