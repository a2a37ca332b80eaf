import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatSize, MAX_SIZE, parseSize } from '../../src/manifest/size.js';

test('parseSize accepts integers and binary suffixes', () => {
  assert.deepEqual(parseSize(0), { ok: true, bytes: 0 });
  assert.deepEqual(parseSize(512), { ok: true, bytes: 512 });
  assert.deepEqual(parseSize('512'), { ok: true, bytes: 512 });
  assert.deepEqual(parseSize('64K'), { ok: true, bytes: 65536 });
  assert.deepEqual(parseSize('20G'), { ok: true, bytes: 20 * 2 ** 30 });
  assert.deepEqual(parseSize(MAX_SIZE), { ok: true, bytes: MAX_SIZE });
  assert.deepEqual(parseSize('7P'), { ok: true, bytes: 7 * 2 ** 50 });
});

test('parseSize refuses anything else, and values beyond 2^53 - 1', () => {
  for (const bad of [
    -1,
    1.5,
    '1.5G',
    '64k',
    '64KB',
    '',
    ' 1',
    '0x10',
    'G',
    '-1',
    true,
    null,
    {},
    MAX_SIZE + 1,
    '8P',
    '1E',
    '9007199254740992',
  ]) {
    const r = parseSize(bad);
    assert.equal(r.ok, false, `accepted ${JSON.stringify(bad)}`);
  }
});

test('formatSize prints the largest exact suffix', () => {
  assert.equal(formatSize(65536), '64K');
  assert.equal(formatSize(1024 * 1024 + 512), '1049088');
  assert.equal(formatSize(0), '0');
  assert.equal(formatSize(3 * 2 ** 30), '3G');
});
