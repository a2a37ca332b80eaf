/**
 * The file identifier and the header pair. Each header is checksummed
 * (CRC-32C over its 4 KiB) and carries a sequence number: the valid header
 * with the larger number is the current one. A copy with a bad checksum is
 * ignored, so an image survives a torn header write; two valid headers with
 * the same number are accepted only when identical (Disk2VHD writes them so),
 * as QEMU does.
 */
import { crc32cWithHole } from './crc32c.js';
import { corrupt, vhdxError } from './errors.js';
import { HEADER_SECTION, HEADER_SIZE, MiB } from './layout.js';

export interface VhdxHeader {
  /** Which copy is current: 0 (at 64 KiB) or 1 (at 128 KiB). */
  index: 0 | 1;
  sequenceNumber: bigint;
  fileWriteGuid: Buffer;
  dataWriteGuid: Buffer;
  /** All zeroes: the log is empty. */
  logGuid: Buffer;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

/** True when the first bytes of a file carry the VHDX file identifier. */
export function hasFileIdentifier(head: Buffer): boolean {
  return head.length >= 8 && head.toString('latin1', 0, 8) === 'vhdxfile';
}

/** The creator string of the file identifier (UTF-16LE, up to 256 code units, NUL-terminated). */
export function creatorOf(ident: Buffer): string {
  const raw = ident.subarray(8, Math.min(ident.length, 8 + 512));
  const s = raw.subarray(0, raw.length - (raw.length % 2)).toString('utf16le');
  const nul = s.indexOf('\0');
  return nul < 0 ? s : s.slice(0, nul);
}

/** Decodes one header copy; undefined when its checksum, signature or version is wrong. */
export function decodeHeader(buf: Buffer, index: 0 | 1): VhdxHeader | undefined {
  if (buf.length < HEADER_SIZE) return undefined;
  const b = buf.subarray(0, HEADER_SIZE);
  if (b.toString('latin1', 0, 4) !== 'head') return undefined;
  if (crc32cWithHole(b, 4) !== b.readUInt32LE(4)) return undefined;
  const version = b.readUInt16LE(66);
  if (version !== 1) return undefined;
  return {
    index,
    sequenceNumber: b.readBigUInt64LE(8),
    fileWriteGuid: Buffer.from(b.subarray(16, 32)),
    dataWriteGuid: Buffer.from(b.subarray(32, 48)),
    logGuid: Buffer.from(b.subarray(48, 64)),
    logVersion: b.readUInt16LE(64),
    version,
    logLength: b.readUInt32LE(68),
    logOffset: Number(b.readBigUInt64LE(72) > BigInt(Number.MAX_SAFE_INTEGER) ? -1n : b.readBigUInt64LE(72)),
  };
}

/** The current header of the pair, or IMAGE_CORRUPT naming why none is usable. */
export function currentHeader(h1: Buffer, h2: Buffer, file: string): VhdxHeader {
  const a = decodeHeader(h1, 0);
  const b = decodeHeader(h2, 1);
  if (!a && !b)
    throw corrupt(
      file,
      'header',
      'no valid header (both copies fail the checksum, signature or version check)',
    );
  let h: VhdxHeader;
  if (a && b) {
    if (a.sequenceNumber === b.sequenceNumber) {
      if (!h1.subarray(0, HEADER_SIZE).equals(h2.subarray(0, HEADER_SIZE))) {
        throw corrupt(
          file,
          'header.sequence_number',
          'both headers are valid, differ, and have the same sequence number',
        );
      }
      h = a;
    } else h = a.sequenceNumber > b.sequenceNumber ? a : b;
  } else h = (a ?? b)!;
  checkLogFields(h, file);
  return h;
}

/** The log offset and version are checked whether or not the log is in use (as QEMU does). */
function checkLogFields(h: VhdxHeader, file: string): void {
  if (h.logVersion !== 0) {
    throw vhdxError(
      'IMAGE_UNSUPPORTED',
      file,
      'header.log_version',
      `log version ${h.logVersion} is not supported`,
    );
  }
  if (h.logOffset < HEADER_SECTION || h.logOffset % MiB !== 0) {
    throw corrupt(
      file,
      'header.log_offset',
      `log offset ${h.logOffset} is not a multiple of 1 MiB past the header section`,
    );
  }
}
