import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TableCache } from '../../src/block/format/qcow2/table-cache.js';

test('concurrent misses on one table load it once and share the result', async () => {
  let loads = 0;
  const cache = new TableCache(4096, async (off) => {
    loads++;
    await new Promise((r) => setTimeout(r, 5));
    return Buffer.alloc(1024, off & 0xff);
  });
  const results = await Promise.all(Array.from({ length: 50 }, () => cache.get(7)));
  assert.equal(loads, 1);
  for (const r of results) assert.equal(r, results[0]);
  assert.equal(cache.stats.loads, 1);
  assert.equal(cache.stats.misses, 50);
});

test('the cache stays within its byte bound and evicts the least recently used table', async () => {
  const cache = new TableCache(3 * 1024, async (off) => Buffer.alloc(1024, off));
  await cache.get(1);
  await cache.get(2);
  await cache.get(3);
  assert.ok(cache.peek(1)); // 1 becomes most recently used
  await cache.get(4); // evicts 2
  assert.equal(cache.size, 3 * 1024);
  assert.equal(cache.peek(2), undefined);
  assert.ok(cache.peek(1));
  assert.ok(cache.peek(3));
  assert.ok(cache.peek(4));
});

test('a table larger than the bound is still cached alone; a failed load is retried', async () => {
  let fail = true;
  const cache = new TableCache(100, async () => {
    if (fail) throw new Error('boom');
    return Buffer.alloc(1000);
  });
  await assert.rejects(Promise.resolve(cache.get(1)), /boom/);
  fail = false;
  assert.equal((await cache.get(1)).length, 1000);
  assert.equal(cache.size, 1000);
  await cache.get(2);
  assert.equal(cache.size, 1000);
  assert.equal(cache.peek(1), undefined);
});
