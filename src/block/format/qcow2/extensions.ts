/**
 * Header extensions (type, length, data padded to 8; type 0 ends the list)
 * between the header and the backing file name (or the end of cluster 0).
 */
import { BlkError } from '../../../errors.js';
import type { Qcow2Header } from './header.js';

export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

export interface Qcow2Extensions {
  backingFormat: string | undefined;
  dataFile: string | undefined;
  featureNames: FeatureName[];
  bitmaps: { count: number; directorySize: number; directoryOffset: number } | undefined;
  /** The backing file name (from backing_file_offset), undefined when none. */
  backingFile: string | undefined;
}

const FEATURE_TYPES = ['incompatible', 'compatible', 'autoclear'] as const;

/** Parses the extension area and the backing file name from `head` (cluster 0, clipped to the file). */
// biome-ignore lint/complexity/noExcessiveCognitiveComplexity: on-disk format code: the checks and steps follow the format's structure in order, one place; splitting would scatter them
export function parseExtensions(head: Buffer, h: Qcow2Header, file: string): Qcow2Extensions {
  const invalid = (field: string, msg: string) => new BlkError('IMAGE_INVALID', msg, { file, field });
  const out: Qcow2Extensions = {
    backingFormat: undefined,
    dataFile: undefined,
    featureNames: [],
    bitmaps: undefined,
    backingFile: undefined,
  };
  const areaEnd = Math.min(h.backingFileOffset !== 0 ? h.backingFileOffset : h.clusterSize, head.length);
  const seen = new Set<number>();
  let at = h.headerLength;
  // v2 images may carry extensions after the 72-byte header too.
  while (at + 8 <= areaEnd) {
    const type = head.readUInt32BE(at);
    const len = head.readUInt32BE(at + 4);
    if (type === EXT_END) break;
    const dataStart = at + 8;
    if (len > areaEnd - dataStart) {
      throw invalid(
        'header_extension',
        `header extension 0x${type.toString(16)} (${len} bytes) overruns its area`,
      );
    }
    if (type !== 0 && seen.has(type) && type !== EXT_FEATURE_NAMES) {
      throw invalid('header_extension', `header extension 0x${type.toString(16)} appears twice`);
    }
    seen.add(type);
    const data = head.subarray(dataStart, dataStart + len);
    switch (type) {
      case EXT_BACKING_FORMAT:
        out.backingFormat = data.toString('latin1');
        break;
      case EXT_DATA_FILE:
        out.dataFile = data.toString('utf8');
        break;
      case EXT_FEATURE_NAMES:
        for (let i = 0; i + 48 <= data.length; i += 48) {
          const t = data.readUInt8(i);
          const nameBytes = data.subarray(i + 2, i + 48);
          const nul = nameBytes.indexOf(0);
          const type = FEATURE_TYPES[t];
          if (type === undefined) continue;
          out.featureNames.push({
            type,
            bit: data.readUInt8(i + 1),
            name: nameBytes.subarray(0, nul < 0 ? 46 : nul).toString('latin1'),
          });
        }
        break;
      case EXT_BITMAPS:
        if (len < 24) throw invalid('bitmaps_extension', `bitmaps extension of ${len} bytes is too short`);
        out.bitmaps = {
          count: data.readUInt32BE(0),
          directorySize: Number(data.readBigUInt64BE(8)),
          directoryOffset: Number(data.readBigUInt64BE(16)),
        };
        break;
      default:
        break; // EXT_CRYPTO is refused with the crypt method; unknown extensions are ignored
    }
    at = dataStart + Math.ceil(len / 8) * 8;
  }
  if (h.backingFileOffset !== 0 && h.backingFileSize > 0) {
    out.backingFile = head.toString('utf8', h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
  }
  return out;
}
