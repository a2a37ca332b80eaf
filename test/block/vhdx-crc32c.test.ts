/** CRC-32C against published vectors (RFC 3720 B.4, the "123456789" check value) and VHDX GUID byte order. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { crc32c, crc32cUpdate, crc32cWithHole } from '../../src/block/format/vhdx/crc32c.js';
import { guidBytes, guidText } from '../../src/block/format/vhdx/layout.js';

test('CRC-32C matches the published test vectors', () => {
  assert.equal(crc32c(Buffer.from('123456789')), 0xe3069283);
  assert.equal(crc32c(Buffer.alloc(32, 0)), 0x8a9136aa);
  assert.equal(crc32c(Buffer.alloc(32, 0xff)), 0x62a8ab43);
  assert.equal(crc32c(Buffer.from(Array.from({ length: 32 }, (_, i) => i))), 0x46dd794e);
  assert.equal(crc32c(Buffer.from(Array.from({ length: 32 }, (_, i) => 31 - i))), 0x113fdb5c);
  assert.equal(crc32c(Buffer.alloc(0)), 0);
});

test('the running register continues across pieces, and the checksum field counts as zeroes', () => {
  const data = Buffer.from('The quick brown fox jumps over the lazy dog');
  const reg = crc32cUpdate(crc32cUpdate(0xffffffff, data.subarray(0, 10)), data.subarray(10));
  assert.equal((reg ^ 0xffffffff) >>> 0, crc32c(data));
  const withField = Buffer.from(data);
  withField.writeUInt32LE(0xdeadbeef, 4);
  const zeroed = Buffer.from(data);
  zeroed.writeUInt32LE(0, 4);
  assert.equal(crc32cWithHole(withField, 4), crc32c(zeroed));
  assert.deepEqual(withField.readUInt32LE(4), 0xdeadbeef, 'the input is not modified');
});

test('GUIDs are stored with their first three groups little-endian', () => {
  const b = guidBytes('2DC27766-F623-4200-9D64-115E9BFD4A08');
  assert.equal(b.toString('hex'), '6677c22d23f600429d64115e9bfd4a08');
  assert.equal(guidText(b), '{2DC27766-F623-4200-9D64-115E9BFD4A08}');
});
