import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BACKOFF_MAX_MS, backoffMs, ExportBook } from '../../src/agent/export-status.js';

test('backoff starts at 1 s, doubles, and stops at 5 min', () => {
  assert.deepEqual([1, 2, 3, 4].map(backoffMs), [1000, 2000, 4000, 8000]);
  assert.equal(backoffMs(9), 256_000);
  assert.equal(backoffMs(10), BACKOFF_MAX_MS);
  assert.equal(backoffMs(50), BACKOFF_MAX_MS);
});

test('a failed export waits for its retry time; success resets it', () => {
  const book = new ExportBook();
  book.track('e', 'm', '/x', 'n', 0);
  assert.equal(book.get('e')!.state, 'pending');
  book.failed('e', 'boom', 1000);
  assert.equal(book.inBackoff('e', 1500), true);
  assert.equal(book.inBackoff('e', 2000), false);
  assert.equal(book.nextRetry(1500), 2000);
  book.failed('e', 'boom', 2000);
  assert.equal(book.get('e')!.retryAt, 4000);
  assert.equal(book.get('e')!.since, new Date(1000).toISOString(), 'same state and reason: since unchanged');
  book.failed('e', 'boom', 3000);
  assert.equal(book.inBackoff('e', 3500), true);
  book.retryNow('e');
  assert.equal(book.inBackoff('e', 3500), false, 'a changed manifest is tried at once');
  book.ready('e', 5000);
  assert.equal(book.get('e')!.failures, 0);
  assert.equal(book.get('e')!.since, new Date(5000).toISOString());
  book.retain(new Set());
  assert.equal(book.get('e'), undefined);
});

test('a terminal failure waits for a change, not for time; retryNow ends the wait', () => {
  const book = new ExportBook();
  book.track('bad', 'm', '/mnt/bad', 'bad-fmt', 0);
  book.track('slow', 'm', '/mnt/slow', 'slow-fmt', 0);
  book.failed('bad', 'add-node bad-fmt: corrupt', 1000, { files: ['/img/bad'], fingerprint: 'x' });
  book.failed('slow', 'locked', 1000);
  // Hours later the terminal one still waits; the timer only knows the backoff of the other.
  assert.equal(book.inBackoff('bad', 1000 + 3_600_000), true);
  assert.equal(book.nextRetry(1000), 2000);
  assert.deepEqual(
    book.terminal().map((r) => r.id),
    ['bad'],
  );
  book.ready('slow', 3000);
  assert.equal(book.nextRetry(3000), undefined, 'no timer for a terminal failure');
  book.retryNow('bad');
  assert.equal(book.inBackoff('bad', 3000), false);
  assert.deepEqual(book.terminal(), []);
});
