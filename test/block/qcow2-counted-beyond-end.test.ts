/**
 * Clusters counted past the end of the file (refcount.ts
 * coverCountedBeyondEnd), a regression found by the power-loss test
 * (qcow2-powerloss.test.ts, backing overlay, seed 15): a writer counts
 * clusters ahead of the file and grows the file with ftruncate; after a power
 * loss the refcount block was on disk and the growth was not. The next
 * writable open took everything past the end of the file as free, handed
 * the counted clusters out again and raised their refcount to 2 under COPIED
 * entries: `qemu-img check` exit 2 ("ERROR OFLAG_COPIED data cluster ...
 * refcount=2"). Here the same state is made by hand: refcount 1 for clusters
 * past the end of a fresh image.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { openImage } from '../../src/block/open-image.js';
import { needTools, randomBytes, run, seededRandom, tempDir } from '../helpers/tools.js';
import { createQcow2, M } from './images.js';

test('clusters a refcount block counts past the end of the file are not handed out again', async (t) => {
  if (!needTools(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const image = createQcow2(join(dir, 'a.qcow2'), 2 * M, { cluster_size: '4096' });
  const head = readFileSync(image);
  const cs = 4096;
  const fileClusters = Math.ceil(statSync(image).size / cs);
  const block = Number(head.readBigUInt64BE(Number(head.readBigUInt64BE(48))) & ~0x1ffn);
  // Refcount 1 (16-bit entries) for the 12 clusters after the end of the file.
  const fd = openSync(image, 'r+');
  try {
    for (let c = fileClusters; c < fileClusters + 12; c++)
      writeSync(fd, Buffer.from([0, 1]), 0, 2, block + 2 * c);
  } finally {
    closeSync(fd);
  }
  const img = await openImage({ filename: image, format: 'qcow2', readOnly: false });
  try {
    const rand = seededRandom(3);
    for (let i = 0; i < 6; i++) await img.node.write(i * 300 * 1024, randomBytes(rand, 9000));
    await img.node.flush();
  } finally {
    await img.close();
  }
  const r = run('qemu-img', ['check', image]);
  assert.ok(r.status === 0 || r.status === 3, `qemu-img check exited ${r.status}: ${r.stdout}${r.stderr}`);
  assert.doesNotMatch(r.stdout, /ERROR/);
});
