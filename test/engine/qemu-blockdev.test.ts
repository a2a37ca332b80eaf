/** Manifest options → QMP arguments, image-head checks, probing for QEMU, and the state file. */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import {
  blockdevArgs,
  checkImageHead,
  exportArgs,
  probedQemuFormat,
} from '../../src/engine/qemu/blockdev.js';
import { emptyState, loadState, saveState } from '../../src/engine/qemu/state.js';
import { tempDir } from '../helpers/tools.js';

test('blockdev-add arguments: read-only exactly as asked, backing always explicit for formats that have one', () => {
  assert.deepEqual(
    blockdevArgs(
      { 'node-name': 'p', driver: 'file', 'read-only': true, filename: '/img/a', locking: 'auto' },
      'file',
    ),
    { driver: 'file', 'node-name': 'p', 'read-only': true, filename: '/img/a', locking: 'auto' },
  );
  // `auto` resolved to qcow2: backing absent in the manifest → null, never QEMU's own lookup.
  assert.deepEqual(
    blockdevArgs({ 'node-name': 'f', driver: 'auto', 'read-only': false, file: 'p' }, 'qcow2'),
    {
      driver: 'qcow2',
      'node-name': 'f',
      'read-only': false,
      file: 'p',
      backing: null,
    },
  );
  assert.equal(
    blockdevArgs({ 'node-name': 'f', driver: 'vmdk', 'read-only': true, file: 'p', backing: 'b' }, 'vmdk')
      .backing,
    'b',
  );
  assert.equal(
    'backing' in blockdevArgs({ 'node-name': 'f', driver: 'vhdx', 'read-only': true, file: 'p' }, 'vhdx'),
    false,
  );
  assert.deepEqual(
    blockdevArgs(
      { 'node-name': 'w', driver: 'raw', 'read-only': true, file: 'f', offset: 512, size: 1024 },
      'raw',
    ),
    { driver: 'raw', 'node-name': 'w', 'read-only': true, file: 'f', offset: 512, size: 1024 },
  );
  assert.deepEqual(
    exportArgs({
      type: 'fuse',
      id: 'e',
      'node-name': 'f',
      mountpoint: '/m',
      'create-mountpoint': true,
      writable: true,
      growable: false,
      'allow-other': 'off',
    }),
    {
      type: 'fuse',
      id: 'e',
      'node-name': 'f',
      mountpoint: '/m',
      writable: true,
      growable: false,
      'allow-other': 'off',
    },
  );
});

test('probing for the qemu engine names QEMU formats; unknown ones are refused by name', () => {
  const head = (s: string) => Buffer.concat([Buffer.from(s, 'latin1'), Buffer.alloc(512)]).subarray(0, 512);
  assert.equal(probedQemuFormat(head('KDMV'), '/x'), 'vmdk');
  assert.equal(probedQemuFormat(head('vhdxfile'), '/x'), 'vhdx');
  assert.equal(probedQemuFormat(head('conectix'), '/x'), 'vpc');
  assert.equal(probedQemuFormat(head('QED\0'), '/x'), 'qed');
  const vdi = Buffer.alloc(512);
  vdi.writeUInt32LE(0xbeda107f, 0x40);
  assert.equal(probedQemuFormat(vdi, '/x'), 'vdi');
  assert.equal(probedQemuFormat(Buffer.alloc(512), '/x'), 'raw');
  assert.throws(
    () => probedQemuFormat(head('LUKS\xba\xbe'), '/x'),
    /format luks is not supported by the qemu engine/,
  );
});

test('image heads that would make QEMU open other host files are refused', () => {
  const qcow2 = Buffer.alloc(512);
  qcow2.write('QFI\xfb', 0, 'latin1');
  qcow2.writeUInt32BE(3, 4);
  checkImageHead('qcow2', qcow2, '/x');
  qcow2.writeBigUInt64BE(4n, 72); // external data file
  assert.throws(
    () => checkImageHead('qcow2', qcow2, '/x'),
    (e: Error & { code: string }) => e.code === 'BACKING_POLICY',
  );
  const desc = Buffer.from('# Disk DescriptorFile\nRW 100 FLAT "/etc/shadow" 0\n');
  assert.throws(() => checkImageHead('vmdk', desc, '/x'), /descriptor file names its extents/);
  checkImageHead('vmdk', Buffer.from('KDMV'), '/x');
});

test('the state file round-trips, and a torn one reads as empty', async (t) => {
  const dir = tempDir(t);
  const p = join(dir, 'state.json');
  assert.deepEqual(await loadState(p), emptyState());
  const s = emptyState(42);
  s.nodes.push({
    options: { 'node-name': 'p', driver: 'file', 'read-only': true, filename: '/a' },
    args: { x: 1 },
  });
  await saveState(p, s);
  assert.deepEqual(await loadState(p), s);
  writeFileSync(p, '{"version": 1, "pid": ');
  assert.deepEqual(await loadState(p), emptyState());
});
