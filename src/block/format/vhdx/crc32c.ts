/**
 * CRC-32C (Castagnoli: reflected polynomial 0x82F63B78, initial value and
 * final xor 0xFFFFFFFF), the checksum of every VHDX header, region table and
 * log entry. Table-driven, one byte at a time.
 */

const TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** Continues a running CRC-32C register (not finalized) over `buf`. */
export function crc32cUpdate(reg: number, buf: Uint8Array): number {
  let c = reg;
  for (let i = 0; i < buf.length; i++) c = TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** The CRC-32C of `buf`. */
export function crc32c(buf: Uint8Array): number {
  return (crc32cUpdate(0xffffffff, buf) ^ 0xffffffff) >>> 0;
}

/**
 * The CRC-32C of `buf` with the 4-byte checksum field at `field` counted as
 * zeroes (how VHDX checksums are computed), without modifying `buf`.
 */
export function crc32cWithHole(buf: Uint8Array, field: number): number {
  let c = crc32cUpdate(0xffffffff, buf.subarray(0, field));
  c = crc32cUpdate(c, ZERO4);
  c = crc32cUpdate(c, buf.subarray(field + 4));
  return (c ^ 0xffffffff) >>> 0;
}

const ZERO4 = new Uint8Array(4);
