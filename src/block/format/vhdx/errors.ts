/** The errors of the vhdx driver: each names the image and the field that was wrong. */
import { BlkError, type BlkErrorCode } from '../../../errors.js';

/** A BlkError about `field` of the image at `file`. */
export function vhdxError(code: BlkErrorCode, file: string, field: string, message: string): BlkError {
  return new BlkError(code, `vhdx: ${message}`, { file, field });
}

/** IMAGE_CORRUPT about `field` of the image at `file`. */
export function corrupt(file: string, field: string, message: string): BlkError {
  return vhdxError('IMAGE_CORRUPT', file, field, message);
}
