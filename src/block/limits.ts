/** Limits of the block layer. */

/** Longest backing chain followed below an image (the image itself is depth 0). */
export const MAX_BACKING_DEPTH = 16;

/** Default bound of a qcow2 node's L2-table cache (maps 32 GiB with 64 KiB clusters). */
export const DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024;
