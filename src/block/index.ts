/** The block layer's public surface. */
export type { BlockDriver, OpenContext, ReopenOptions } from './driver.js';
export { BlockGraph, openGraph, openNode } from './graph.js';
export { DEFAULT_L2_CACHE_BYTES, MAX_BACKING_DEPTH } from './limits.js';
export { reopenTogether } from './node.js';
export { type OpenedImage, type OpenImageOptions, openImage } from './open-image.js';
export type { NodeOptions } from './options.js';
export {
  findPartition,
  listPartitions,
  nodeReader,
  type Partition,
  type PartitionScheme,
  type ReadAt,
} from './partition/index.js';
export { makePathPolicy, type PathPolicy } from './path-policy.js';
export { type ProbedFormat, probeBytes, probeFormat, probeNode } from './probe.js';
export { openRawWindow } from './raw-window.js';
export type { BlockCapabilities, BlockExtent, BlockNode, BlockRole, ResolvedOptions } from './types.js';
