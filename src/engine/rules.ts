/**
 * Rules every way of serving an image keeps (both engines, and the one-shot
 * `blkexport mount`), written once.
 */
import { BlkError } from '../errors.js';

/**
 * The refusal of writing through a format that was only probed as raw: a
 * guest that wrote an image header into its raw disk must not change what
 * the next probe sees. `confirm` says how to confirm raw ("format: raw").
 */
export function probedRawError(what: string, confirm: string): BlkError {
  return new BlkError(
    'EXPORT_INVALID',
    `refusing to write to ${what}: its format was only probed as raw; give ${confirm} to confirm ` +
      '(a guest could have written an image header into it)',
  );
}
