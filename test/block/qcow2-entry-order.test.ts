/**
 * The order of refcount table entries in the write-back (metadata-cache.ts
 * entryLevels), a regression found by the power-loss test
 * (qcow2-powerloss.test.ts): entries naming several new refcount blocks were
 * written concurrently, so one could reach the disk before the entry of the
 * block that counts it — the new block then had refcount 0 on disk while the
 * table referenced it (qemu-img check: "ERROR cluster 521 refcount=0
 * reference=1"), and the next allocation in its range could overwrite it.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { entryLevels } from '../../src/block/format/qcow2/metadata-cache.js';

/** An 8-byte refcount table entry naming the block at `off`. */
const entry = (off: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(off));
  return b;
};

test('refcount table entries: a block counted by another new block goes a level later', () => {
  // The power-loss test found this (512 B clusters, refcount bits 64: 64 refcounts per block): eight
  // new blocks at clusters 517..524 written in one step; block 518 (entry 8) counts clusters
  // 512..575, so itself and the other seven. Entry 8 must be durable before entries 1..7.
  const cs = 512;
  const entries: [number, Buffer][] = [
    [1, entry(517 * cs)],
    [8, entry(518 * cs)],
    [2, entry(519 * cs)],
    [7, entry(524 * cs)],
  ];
  const levels = entryLevels(entries, 64, cs);
  assert.deepEqual(
    levels.map((l) => l.map(([ti]) => ti)),
    [[8], [1, 2, 7]],
  );
  // Blocks counted by blocks already on disk (or by themselves) need one level.
  assert.equal(entryLevels([[1, entry(3 * cs)]], 64, cs).length, 1);
  // A cycle cannot be ordered: written together.
  assert.deepEqual(
    entryLevels(
      [
        [1, entry(130 * cs)],
        [2, entry(70 * cs)],
      ],
      64,
      cs,
    ).map((l) => l.length),
    [2],
  );
});
