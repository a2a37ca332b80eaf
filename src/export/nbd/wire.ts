/**
 * Encoders and decoders of the NBD messages: pure functions from fields to
 * bytes and back (big-endian, as the protocol says). Nothing here touches a
 * socket; connection.ts moves the bytes.
 */
import {
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  NBD_MAGIC,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_MAGIC,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  REQUEST_HEADER_SIZE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from './constants.js';

/** The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags. */
export function encodeGreeting(): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return b;
}

export interface OptionHeader {
  /** false: the client did not start the option with IHAVEOPT (a protocol violation). */
  magicOk: boolean;
  option: number;
  length: number;
}

/** Decodes the 16 bytes of an option header (IHAVEOPT, option, data length). */
export function decodeOptionHeader(b: Buffer): OptionHeader {
  if (b.length !== OPTION_HEADER_SIZE) throw new RangeError('option header is 16 bytes');
  return {
    magicOk: b.readBigUInt64BE(0) === IHAVEOPT,
    option: b.readUInt32BE(8),
    length: b.readUInt32BE(12),
  };
}

/** An option reply: magic, the option answered, the reply type, the data. */
export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

/** The answer to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeroes unless the client opted out. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

export interface Request {
  magicOk: boolean;
  flags: number;
  type: number;
  /** The client's 8-byte handle, echoed in every reply (a copy, not a view of the read buffer). */
  handle: Buffer;
  /** 64-bit on the wire: a bigint until checked against the export size. */
  offset: bigint;
  length: number;
}

/** Decodes a 28-byte request header. */
export function decodeRequest(b: Buffer): Request {
  if (b.length !== REQUEST_HEADER_SIZE) throw new RangeError('request header is 28 bytes');
  return {
    magicOk: b.readUInt32BE(0) === REQUEST_MAGIC,
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    handle: Buffer.from(b.subarray(8, 16)),
    offset: b.readBigUInt64BE(16),
    length: b.readUInt32BE(24),
  };
}

/** Encodes a request header (for tests and clients in tests). */
export function encodeRequest(
  type: number,
  flags: number,
  handle: bigint,
  offset: bigint | number,
  length: number,
): Buffer {
  const b = Buffer.alloc(REQUEST_HEADER_SIZE);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length >>> 0, 24);
  return b;
}

/** A simple reply header (data, if any, follows it). */
export function encodeSimpleReply(error: number, handle: Buffer): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8);
  return b;
}

/** A structured reply chunk header with room for `extra` bytes of fixed payload after it. */
function chunkHeader(flags: number, type: number, handle: Buffer, length: number, extra = 0): Buffer {
  const b = Buffer.alloc(20 + extra);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  handle.copy(b, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

/** The final chunk that says "done, no error". */
export function encodeNoneChunk(handle: Buffer): Buffer {
  return chunkHeader(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
}

/** The header of an OFFSET_DATA chunk (20 + 8 bytes); `dataLength` bytes of data follow it. */
export function encodeDataChunkHeader(
  handle: Buffer,
  offset: number,
  dataLength: number,
  done: boolean,
): Buffer {
  const b = chunkHeader(done ? REPLY_FLAG_DONE : 0, REPLY_TYPE_OFFSET_DATA, handle, 8 + dataLength, 8);
  b.writeBigUInt64BE(BigInt(offset), 20);
  return b;
}

/** An OFFSET_HOLE chunk: `size` bytes at `offset` read as zeroes. */
export function encodeHoleChunk(handle: Buffer, offset: number, size: number, done: boolean): Buffer {
  const b = chunkHeader(done ? REPLY_FLAG_DONE : 0, REPLY_TYPE_OFFSET_HOLE, handle, 12, 12);
  b.writeBigUInt64BE(BigInt(offset), 20);
  b.writeUInt32BE(size, 28);
  return b;
}

/** One block status descriptor: an extent length and its flags. */
export interface StatusDescriptor {
  length: number;
  flags: number;
}

/** A BLOCK_STATUS chunk for one metadata context. */
export function encodeBlockStatusChunk(
  handle: Buffer,
  contextId: number,
  descriptors: readonly StatusDescriptor[],
  done: boolean,
): Buffer {
  const payload = 4 + 8 * descriptors.length;
  const b = chunkHeader(done ? REPLY_FLAG_DONE : 0, REPLY_TYPE_BLOCK_STATUS, handle, payload, payload);
  b.writeUInt32BE(contextId, 20);
  descriptors.forEach((d, i) => {
    b.writeUInt32BE(d.length, 24 + 8 * i);
    b.writeUInt32BE(d.flags >>> 0, 28 + 8 * i);
  });
  return b;
}

/** An error chunk (ERROR, or ERROR_OFFSET when `offset` is given), always the final chunk here. */
export function encodeErrorChunk(handle: Buffer, error: number, message: string, offset?: number): Buffer {
  // The message length field is 16 bits; keep messages short and whole characters.
  const msg = Buffer.from(message.slice(0, 200), 'utf8');
  const extra = offset === undefined ? 0 : 8;
  const type = offset === undefined ? REPLY_TYPE_ERROR : REPLY_TYPE_ERROR_OFFSET;
  const b = chunkHeader(REPLY_FLAG_DONE, type, handle, 6 + msg.length + extra, 6 + msg.length + extra);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(msg.length, 24);
  msg.copy(b, 26);
  if (offset !== undefined) b.writeBigUInt64BE(BigInt(offset), 26 + msg.length);
  return b;
}
