/**
 * The pool of READ reply buffers (src/export/nbd/read-buffers.ts): what is
 * reused, what is never kept, and the cap. That reused buffers never leak
 * stale bytes is checked end to end by nbdcopy against qemu-img in
 * test/integration/nbd-clients.test.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { returnReadBuffer, takeReadBuffer } from '../../src/export/nbd/read-buffers.js';

test('a large READ buffer given back is handed out again; small ones and views are not kept', () => {
  const big = takeReadBuffer(256 * 1024);
  assert.equal(big.length, 256 * 1024);
  returnReadBuffer(big);
  assert.equal(takeReadBuffer(256 * 1024), big, 'the returned buffer is reused');
  assert.notEqual(takeReadBuffer(256 * 1024), big, 'and handed out only once');

  const small = takeReadBuffer(4096);
  returnReadBuffer(small);
  assert.notEqual(takeReadBuffer(4096).buffer, small.buffer, 'below 64 KiB nothing is pooled');

  const whole = takeReadBuffer(128 * 1024);
  returnReadBuffer(whole.subarray(0, 64 * 1024));
  const next = takeReadBuffer(64 * 1024);
  assert.notEqual(next.buffer, whole.buffer, 'a view of a buffer never enters the pool');
  assert.equal(next.length, 64 * 1024);
});

test('the pool keeps at most 32 MiB', () => {
  const size = 4 * 1024 * 1024;
  const taken = Array.from({ length: 10 }, () => takeReadBuffer(size));
  for (const b of taken) returnReadBuffer(b);
  const again = Array.from({ length: 10 }, () => takeReadBuffer(size));
  const reused = again.filter((b) => taken.includes(b)).length;
  assert.equal(reused, 8, '8 × 4 MiB = 32 MiB kept, the other two left to the GC');
});
