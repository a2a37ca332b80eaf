/**
 * The payloads of handshake options, decoded and checked (pure functions):
 * what an NBD_OPT_INFO/GO asks for, what a LIST/SET_META_CONTEXT asks for,
 * and the NBD_REP_INFO / NBD_REP_SERVER / NBD_REP_META_CONTEXT data the
 * server answers with. A malformed payload is a value (`invalid`), never a
 * throw: the server answers NBD_REP_ERR_INVALID and keeps the connection.
 */
import {
  INFO_BLOCK_SIZE,
  type INFO_DESCRIPTION,
  INFO_EXPORT,
  type INFO_NAME,
  MAX_STRING,
} from './constants.js';

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A protocol string: valid UTF-8, no NUL, at most 4096 bytes; undefined when it is not. */
export function decodeString(b: Buffer): string | undefined {
  if (b.length > MAX_STRING) return undefined;
  let s: string;
  try {
    s = utf8.decode(b);
  } catch {
    return undefined;
  }
  return s.includes('\0') ? undefined : s;
}

export type Parsed<T> = { ok: true; value: T } | { ok: false; invalid: string };

const invalid = (why: string): { ok: false; invalid: string } => ({ ok: false, invalid: why });

export interface InfoRequest {
  name: string;
  /** The NBD_INFO_* types the client asked for. */
  infos: number[];
}

/** NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count, count × 16-bit info types. */
export function parseInfoRequest(data: Buffer): Parsed<InfoRequest> {
  if (data.length < 6) return invalid('option data too short');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 6) return invalid('export name runs past the option data');
  const name = decodeString(data.subarray(4, 4 + nameLen));
  if (name === undefined) return invalid('export name is not a valid string');
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 6 + nameLen + 2 * count)
    return invalid('information request count does not match the data');
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLen + 2 * i));
  return { ok: true, value: { name, infos } };
}

export interface MetaContextRequest {
  name: string;
  queries: string[];
}

/** LIST/SET_META_CONTEXT data: name length, name, query count, queries (length, string). */
export function parseMetaContextRequest(data: Buffer): Parsed<MetaContextRequest> {
  if (data.length < 8) return invalid('option data too short');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 8) return invalid('export name runs past the option data');
  const name = decodeString(data.subarray(4, 4 + nameLen));
  if (name === undefined) return invalid('export name is not a valid string');
  let at = 4 + nameLen;
  const count = data.readUInt32BE(at);
  at += 4;
  // Each query takes at least 4 bytes: a count beyond that cannot be honest.
  if (count > (data.length - at) / 4) return invalid('query count does not match the data');
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return invalid('query runs past the option data');
    const len = data.readUInt32BE(at);
    at += 4;
    if (len > data.length - at) return invalid('query runs past the option data');
    const q = decodeString(data.subarray(at, at + len));
    if (q === undefined) return invalid('query is not a valid string');
    queries.push(q);
    at += len;
  }
  if (at !== data.length) return invalid('trailing bytes after the queries');
  return { ok: true, value: { name, queries } };
}

/** Encodes LIST/SET_META_CONTEXT data (for tests and clients in tests). */
export function encodeMetaContextRequest(name: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [u32(Buffer.byteLength(name)), Buffer.from(name), u32(queries.length)];
  for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
  return Buffer.concat(parts);
}

/** Encodes INFO/GO data (for tests and clients in tests). */
export function encodeInfoRequest(name: string, infos: readonly number[]): Buffer {
  const b = Buffer.alloc(6 + Buffer.byteLength(name) + 2 * infos.length);
  b.writeUInt32BE(Buffer.byteLength(name), 0);
  const at = 4 + b.write(name, 4);
  b.writeUInt16BE(infos.length, at);
  infos.forEach((t, i) => {
    b.writeUInt16BE(t, at + 2 + 2 * i);
  });
  return b;
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n, 0);
  return b;
}

/** NBD_INFO_EXPORT: size and transmission flags. */
export function infoExport(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(INFO_EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

/** NBD_INFO_NAME or NBD_INFO_DESCRIPTION: a type and a string. */
export function infoString(type: typeof INFO_NAME | typeof INFO_DESCRIPTION, s: string): Buffer {
  const text = Buffer.from(s, 'utf8');
  const b = Buffer.alloc(2 + text.length);
  b.writeUInt16BE(type, 0);
  text.copy(b, 2);
  return b;
}

/** NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum payload. */
export function infoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

/** NBD_REP_SERVER data: name length, name, then the description (human-readable). */
export function repServer(name: string, description: string | undefined): Buffer {
  const n = Buffer.from(name, 'utf8');
  return Buffer.concat([u32(n.length), n, Buffer.from(description ?? '', 'utf8')]);
}

/** NBD_REP_META_CONTEXT data: context id and name. */
export function repMetaContext(id: number, name: string): Buffer {
  return Buffer.concat([u32(id), Buffer.from(name, 'utf8')]);
}
