import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BlkError, describeError } from '../src/errors.js';

test('BlkError formats manifest positions as FILE:LINE:COL: message (at path)', () => {
  const e = new BlkError('MANIFEST_SCHEMA', 'unknown field "foo"', {
    file: 'a.yaml',
    line: 3,
    col: 5,
    path: '/spec',
  });
  assert.equal(e.format(), 'a.yaml:3:5: unknown field "foo" (at /spec)');
  assert.equal(describeError(e), e.format());
});

test('BlkError formats image errors with the field', () => {
  const e = new BlkError('IMAGE_INVALID', 'cluster_bits 30 out of range', {
    file: '/x.qcow2',
    field: 'cluster_bits',
  });
  assert.equal(e.format(), '/x.qcow2: cluster_bits 30 out of range (field cluster_bits)');
  assert.equal(describeError(new Error('plain')), 'plain');
});
